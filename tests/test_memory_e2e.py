"""Memory end to end: agent subprocesses share context, delegate, checkpoint; an operator
wipes and restores with agentctl; then a replay (from 1, and from a snapshot) equals the
live projection table for table."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from ledgerbus.bus import query, subjects
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import db as dbmod
from tests.snapshot_support import assert_snapshots_fold_alike
from tests.support import Procs, agentctl, wait_for_record, wait_until
from tests.test_e2e import joined


async def run_notes(settings: Settings, steps: list[dict[str, Any]], expect: str = "completed") -> dict[str, Any]:
    code, out, err = await agentctl(settings, "submit", "notes", "--input", json.dumps({"steps": steps}), "--wait",
                                    "--timeout", "30", "--json")
    result: dict[str, Any] = json.loads(out)
    assert (result["status"], code) == (expect, 0 if expect == "completed" else 1), (result, err)
    return result


async def ok_json(settings: Settings, *args: str) -> Any:
    code, out, err = await agentctl(settings, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def live_dump(settings: Settings, admin: Client) -> tuple[int, dict[str, Any]]:
    """The live projection once it has caught up with the log's head."""
    head = (await admin.jetstream().stream_info(subjects.AUDIT_STREAM)).state.last_seq

    async def caught_up() -> bool:
        return bool((await query.ask(admin, "projections", "digest", {}))["position"] >= head)

    await wait_until(caught_up, what=f"the projector at seq {head}")
    db = await dbmod.open_reader(settings.db_path)
    try:
        await db.execute("BEGIN")
        dump = await dbmod.dump(db)
        await db.execute("COMMIT")
    finally:
        await db.close()
    [(_, position)] = dump["tracking"]
    return position, dump


async def replay_dump(settings: Settings, path: Path, *args: str) -> dict[str, Any]:
    await ok_json(settings, "replay", "--db", str(path), *args)
    db = await dbmod.open_reader(path)
    try:
        return await dbmod.dump(db)
    finally:
        await db.close()


async def test_agents_share_delegate_checkpoint_and_a_replay_equals_the_live_projection(
    procs: Procs, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    js = admin.jetstream()
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    scribe = await procs.start("scribe-1", "agent", "--name", "scribe-1", "--skills", "notes")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo")
    for name in ("scribe-1", "echo-1"):
        await wait_for_record(js, joined(name))

    first = await run_notes(settings, [
        {"remember": "user.name", "value": "Ada", "core": True},
        {"remember": "draft", "value": 1},
        {"observe": "the build is red"},
        {"reason": "so fix the build first"},
        {"share": "plan", "namespace": "team", "value": {"step": 1}},
        # Long enough to still be listed a few commands later on a loaded machine (5 s was
        # not, with one test per core); the test waits for it to expire all the same.
        {"share": "flash", "namespace": "team", "value": "gone soon", "ttl_s": 12},
        {"read": "flash", "namespace": "team"},
        {"recall": "user.name"},
        {"delegate": "echo", "input": {"x": 1}},
        {"checkpoint": "after first task"},
    ])
    flash, name, echoed, checkpoint_id = first["output"]["results"]
    assert (flash, name, echoed) == ("gone soon", "Ada", {"x": 1})
    assert first["agent"] == "scribe-1"

    # The delegated task is a subtask of the first.
    shown = await ok_json(settings, "tasks", "show", first["task_id"])
    [child] = shown["subtasks"]
    child_task = await ok_json(settings, "tasks", "show", child)
    assert (child_task["parent_task_id"], child_task["agent"], child_task["status"]) == (
        first["task_id"], "echo-1", "completed")

    snapshot = tmp_path / "snap.db"
    await ok_json(settings, "snapshot", str(snapshot), "--db", str(settings.db_path))

    # Another agent reads what the first shared, once the key with a TTL has expired.
    # When it expires, from the log (listing it here would race its expiry on a slow machine).
    shared = await wait_for_record(js, lambda r: r.kind == "shared_written" and r.event.key == "flash")
    expires = (shared.at + timedelta(seconds=float(shared.event.ttl_s or 0))).isoformat()
    await scribe.stop()
    await procs.start("scribe-2", "agent", "--name", "scribe-2", "--skills", "notes")
    await wait_for_record(js, joined("scribe-2"))
    await asyncio.sleep(max(0.0, (datetime.fromisoformat(expires) - datetime.now(UTC)).total_seconds()) + 0.1)
    second = await run_notes(settings, [{"read": "plan", "namespace": "team"}, {"read": "flash", "namespace": "team"},
                                        {"recall": "user.name"}])
    assert second["agent"] == "scribe-2"
    assert second["output"]["results"] == [{"step": 1}, None, None]  # scribe-2's memory is its own
    assert [r["key"] for r in await ok_json(settings, "shared", "list", "team")] == ["plan"]
    await run_notes(settings, [{"bogus": 1}], expect="failed")

    # The operator's side: memory show, role, wipe, checkpoint, restore.
    mem = await ok_json(settings, "memory", "show", "scribe-1")
    assert set(mem["knowledge"]) == {"user.name", "draft"} and len(mem["observations"]) == 1
    await ok_json(settings, "memory", "role", "scribe-1", "archivist")
    await ok_json(settings, "memory", "wipe", "scribe-1", "--reason", "test")
    wiped = await ok_json(settings, "memory", "show", "scribe-1")
    assert (wiped["role"], set(wiped["knowledge"]), wiped["observations"]) == ("archivist", {"user.name"}, [])
    saved = await ok_json(settings, "checkpoint", "save", "scribe-1", "--label", "wiped", "--id", "cp-wiped")
    assert saved["verdict"] == "accepted"
    await ok_json(settings, "checkpoint", "restore", "scribe-1", checkpoint_id)
    restored = await ok_json(settings, "memory", "show", "scribe-1")
    assert set(restored["knowledge"]) == {"user.name", "draft"} and restored["role"] is None
    listed = await ok_json(settings, "checkpoint", "list", "scribe-1")
    assert [c["checkpoint_id"] for c in listed] == [checkpoint_id, "cp-wiped"]
    code, _, err = await agentctl(settings, "checkpoint", "restore", "scribe-1", "no-such")
    assert code == 1 and "unknown_checkpoint" in err
    code, _, err = await agentctl(settings, "memory", "set", "bad.name", "k", "v")
    assert code == 2 and "agent" in err

    # Rebuild equals live, from sequence 1 and from the snapshot taken half way.
    position, live = await live_dump(settings, admin)
    full = await replay_dump(settings, tmp_path / "full.db", "--until-seq", str(position))
    tail = await replay_dump(settings, tmp_path / "tail.db", "--until-seq", str(position),
                             "--from-snapshot", str(snapshot))
    assert full == live
    assert tail == live
    assert live["memory"] and live["knowledge"] and live["snap_knowledge"] and live["checkpoints"]
    assert live["shared"] and live["approvals"] == [] and len(live["audit_index"]) == position
    # The log this test made, at rest: a snapshot anywhere in it plus the tail folds alike.
    await procs.stop_all()
    await assert_snapshots_fold_alike(admin.jetstream(), settings)
