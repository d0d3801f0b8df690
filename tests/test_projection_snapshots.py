"""Projection snapshots (projections/snapshots.py): saved by the projector every so many
records; a snapshot plus the tail equals a rebuild from seq 1 and the live projection at the
same position; a projector with no file and `agentctl replay` start from the newest one that
checks, passing over each kind of bad one with a warning naming why; a projector killed
while uploading loses nothing; and a projection behind AUDIT's first record starts from a
snapshot past the gap or says where the gap is."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from structlog.testing import capture_logs

from ledgerbus.bus import chain, codec, subjects
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.events import TaskCompleted, TaskSubmitted, new_id
from ledgerbus.bus.provision import projection_store_config
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import db as dbmod
from ledgerbus.projections import service, snapfile, snapshots
from ledgerbus.projections.errors import LogGapError
from ledgerbus.projections.projector import Projector
from ledgerbus.projections.rebuild import rebuild, rebuild_from_store
from ledgerbus.projections.verify import compare_file
from tests.conftest import RunningRouter
from tests.support import Procs, agentctl, audit_records, claim, send, wait_until

Connect = Callable[[str], Awaitable[Client]]


def tuned(settings: Settings, every: int = 10, keep: int = 3) -> Settings:
    """Snapshots every ``every`` records, and small batches, so a short log makes several."""
    return settings.replace(projection_snapshot_every=every, projection_snapshot_keep=keep, projector_batch=4)


@contextlib.asynccontextmanager
async def projecting(nc: Client, settings: Settings, db_path: Path | None = None) -> AsyncIterator[Projector]:
    """A projector running in this event loop until the block ends."""
    stop = asyncio.Event()
    projector = Projector(nc, settings, db_path)
    running = asyncio.create_task(projector.run(stop))
    try:
        yield projector
    finally:
        stop.set()
        await running


async def last_seq(js: JetStreamContext) -> int:
    return (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq


async def grow(connect_as: Connect, settings: Settings, js: JetStreamContext, count: int) -> int:
    """``count`` more records: tasks submitted, every third claimed and completed. Returns
    the new head."""
    cli, agent = await connect_as("cli"), await connect_as("agent")
    target = await last_seq(js) + count
    sent = 0
    while sent < count:
        task = new_id()
        await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id=task, skill="echo", input={"t": task}))
        sent += 1
        if sent % 3 == 0 and sent + 2 <= count:
            await send(agent, "agent", "w1", claim(settings, "w1", task, "echo"))
            await send(agent, "agent", "w1", TaskCompleted(id=new_id(), task_id=task, attempt=1, output={"ok": sent}))
            sent += 2

    async def audited() -> bool:
        return await last_seq(js) >= target

    await wait_until(audited, what=f"AUDIT at seq {target}")
    return target


async def caught_up(projector: Projector, seq: int) -> None:
    async def there() -> bool:
        return projector.position >= seq

    await wait_until(there, what=f"projector at seq {seq}")


async def snapshot_after(js: JetStreamContext, seq: int) -> int:
    """Wait for a stored snapshot past ``seq``; its position."""
    found: list[int] = []

    async def saved() -> bool:
        found[:] = await snapshots.positions(js)
        return bool(found) and found[-1] > seq

    await wait_until(saved, what=f"a projection snapshot past seq {seq}")
    return found[-1]


async def dump(path: Path) -> dict[str, Any]:
    db = await dbmod.open_db(path)
    try:
        return await dbmod.dump(db)
    finally:
        await db.close()


async def logged_projection(connect_as: Connect, settings: Settings, js: JetStreamContext, db_path: Path,
                            records: int = 24) -> tuple[int, list[int]]:
    """A log of ``records`` records, followed live into ``db_path`` by a projector that saved
    snapshots on the way; the projector stopped at the head. Returns the head and the
    snapshots' positions."""
    async with projecting(await connect_as("projector"), settings, db_path) as projector:
        half = await grow(connect_as, settings, js, records // 2)
        await caught_up(projector, half)
        await snapshot_after(js, 0)
        head = await grow(connect_as, settings, js, records - records // 2)
        await caught_up(projector, head)
    return head, await snapshots.positions(js)


async def test_a_snapshot_plus_the_tail_equals_a_full_rebuild_and_the_live_projection_at_the_same_position(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    js, live = admin.jetstream(), tmp_path / "live.db"
    head, saved = await logged_projection(connect_as, tuned(settings), js, live)
    assert saved and saved[-1] <= head
    restored, reached = await rebuild_from_store(js, tmp_path / "snap.db", until_seq=head,
                                                 memory_list_cap=settings.memory_list_cap)
    assert restored is not None and restored.position == saved[-1] and reached == head
    assert await rebuild(js, tmp_path / "full.db") == head
    live_dump = await dump(live)
    assert await dump(tmp_path / "snap.db") == live_dump == await dump(tmp_path / "full.db")
    assert (await compare_file(js, live)).ok  # what agentctl audit verify --db checks

    # More records while no projector runs: the tail after the newest snapshot is not empty.
    later = await grow(connect_as, settings, js, 5)
    restored, reached = await rebuild_from_store(js, tmp_path / "snap-later.db", memory_list_cap=settings.memory_list_cap)
    assert restored is not None and reached == later and later - restored.position >= 5
    await rebuild(js, tmp_path / "full-later.db")
    assert await dump(tmp_path / "snap-later.db") == await dump(tmp_path / "full-later.db")


async def test_a_projector_with_no_file_or_one_of_another_schema_starts_from_the_newest_snapshot_and_answers_alike(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    js, live = admin.jetstream(), tmp_path / "live.db"
    head, saved = await logged_projection(connect_as, tuned(settings), js, live)
    fresh = tmp_path / "fresh.db"
    with capture_logs() as logs:
        async with projecting(await connect_as("projector"), tuned(settings), fresh) as projector:
            await caught_up(projector, head)
            asked = await (await connect_as("cli")).request(subjects.query("tasks", "list"), b'{"limit": 50}', timeout=5)
    started = next(e for e in logs if e["event"] == "projector_started")
    assert started["from_snapshot"] == saved[-1] and started["position"] == saved[-1]
    assert await dump(fresh) == await dump(live)
    # The query service over the live file answers what the fresh projector answered.
    reader = await dbmod.open_reader(live)
    try:
        expected = await service.answer(service.Reader(reader), subjects.query("tasks", "list"), b'{"limit": 50}')
    finally:
        await reader.close()
    assert json.loads(asked.data) == json.loads(codec.encode(expected))

    # A file of an older schema is set aside, and the snapshot taken instead of a full fold.
    older = tmp_path / "older.db"
    conn = sqlite3.connect(older)
    try:
        conn.executescript("CREATE TABLE tracking (name TEXT PRIMARY KEY, position INTEGER NOT NULL);"
                           f"PRAGMA user_version = {dbmod.SCHEMA_VERSION - 1};")
    finally:
        conn.close()
    with capture_logs() as logs:
        async with projecting(await connect_as("projector"), tuned(settings), older) as projector:
            await caught_up(projector, head)
    assert [e["event"] for e in logs if e["event"] in ("projection_rebuild", "projection_snapshot_loaded")] == [
        "projection_rebuild", "projection_snapshot_loaded"]
    assert next(e for e in logs if e["event"] == "projector_started")["from_snapshot"] == saved[-1]
    assert await dump(older) == await dump(live)


def _forged(data: bytes, position: int, record_hash: str, body: bytes | None = None, **changes: Any) -> bytes:
    """The snapshot ``data`` moved to ``position`` (tied to ``record_hash``), with
    ``changes`` to its header and, given, another ``body`` whose digest it names."""
    stored = io.BytesIO(data)
    header = snapfile.read_header(stored)
    old_body = stored.read()
    digest = hashlib.sha256(body).hexdigest() if body is not None else header.digest
    header = msgspec.structs.replace(header, position=position, record_hash=record_hash, digest=digest, **changes)
    return snapfile.pack_header(header) + (old_body if body is None else body)


async def test_each_bad_snapshot_is_passed_over_with_a_warning_naming_why(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    js = admin.jetstream()
    _, saved = await logged_projection(connect_as, tuned(settings), js, tmp_path / "live.db")
    good = saved[-1]
    head = await grow(connect_as, settings, js, 8)  # room for the bad ones, newer than the good one
    writer = await (await connect_as("projector")).jetstream().object_store(subjects.PROJECTION_BUCKET)
    data = (await writer.get(snapshots.name_of(good))).data or b""
    flipped = bytearray(data)
    flipped[-20] ^= 0xFF  # in the body, which its digest no longer matches

    async def tie(seq: int) -> str:
        found = await snapshots.record_hash(js, seq)
        assert found is not None
        return found

    bad = {
        "corrupt body": _forged(data, good + 1, await tie(good + 1), body=b"not zlib at all" * 10),
        "wrong digest": _forged(bytes(flipped), good + 2, await tie(good + 2)),
        "other schema": _forged(data, good + 3, await tie(good + 3), schema=dbmod.SCHEMA_VERSION + 1),
        "another log": _forged(data, good + 4, "ab" * 32),
        "unknown format": _forged(data, good + 5, await tie(good + 5), version=snapfile.FORMAT + 1),
        "not a snapshot": b"\x00garbage",
    }
    for n, payload in enumerate(bad.values(), start=1):
        await writer.put(snapshots.name_of(good + n), payload)

    fresh = tmp_path / "fresh.db"
    with capture_logs() as logs:
        async with projecting(await connect_as("projector"), tuned(settings, every=1000), fresh) as projector:
            await caught_up(projector, head)
    reasons = {e["name"]: e["reason"] for e in logs if e["event"] == "projection_snapshot_rejected"}
    expected = ["does not decompress", "does not hash to its digest", f"schema v{dbmod.SCHEMA_VERSION + 1}",
                "has hash", "format version", "does not decode"]
    assert len(reasons) == len(bad), reasons
    for n, words in enumerate(expected, start=1):
        assert words in reasons[snapshots.name_of(good + n)], (words, reasons)
    started = next(e for e in logs if e["event"] == "projector_started")
    assert started["from_snapshot"] == good
    await rebuild(js, tmp_path / "full.db")
    assert await dump(fresh) == await dump(tmp_path / "full.db")


async def test_replay_starts_from_the_newest_snapshot_at_or_before_its_target_and_full_from_seq_1(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    js = admin.jetstream()
    head, saved = await logged_projection(connect_as, tuned(settings, keep=2), js, tmp_path / "live.db", records=30)
    assert 1 <= len(saved) <= 2  # the newest two kept
    await rebuild(js, tmp_path / "full.db")

    code, out, err = await agentctl(settings, "replay", "--db", str(tmp_path / "latest.db"))
    assert code == 0, err
    assert f"replayed audit snapshot {snapshots.name_of(saved[-1])} (seq {saved[-1]}) + seq {saved[-1] + 1}..{head}" in out
    code, out, err = await agentctl(settings, "replay", "--db", str(tmp_path / "full-replay.db"), "--full", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["snapshot"] is None and report["from_seq"] == 1 and report["position"] == head
    assert await dump(tmp_path / "latest.db") == await dump(tmp_path / "full-replay.db") == await dump(
        tmp_path / "full.db")

    # A target before the newest snapshot: the newest at or before it, or seq 1.
    target = saved[-1] - 1
    restored, reached = await rebuild_from_store(js, tmp_path / "then.db", until_seq=target,
                                                 memory_list_cap=settings.memory_list_cap)
    older = [p for p in saved if p <= target]
    assert (restored.position if restored else None) == (older[-1] if older else None) and reached == target
    await rebuild(js, tmp_path / "full-then.db", until_seq=target)
    assert await dump(tmp_path / "then.db") == await dump(tmp_path / "full-then.db")
    # By time: the newest snapshot whose newest record is at or before it, and the tail.
    moment = (await audit_records(js))[target - 1].at
    restored, reached = await rebuild_from_store(js, tmp_path / "by-time.db", until_time=moment,
                                                 memory_list_cap=settings.memory_list_cap)
    assert restored is not None or not older
    assert await rebuild(js, tmp_path / "full-by-time.db", until_time=moment) == reached
    assert await dump(tmp_path / "by-time.db") == await dump(tmp_path / "full-by-time.db")


async def test_a_projector_killed_while_uploading_loses_nothing_and_the_next_start_uses_the_snapshot_before(
    running_router: RunningRouter, procs: Procs, connect_as: Connect, admin: Client, settings: Settings,
    tmp_path: Path,
) -> None:
    js = admin.jetstream()
    env = {"LEDGERBUS_PROJECTION_SNAPSHOT_EVERY": "6", "LEDGERBUS_PROJECTOR_BATCH": "4"}
    projector = await procs.start("projector", "projector", LEDGERBUS_FAILPOINTS="projector.snapshot_writing=kill@2",
                                  **env)
    first = 0
    while projector.proc.returncode is None and await last_seq(js) < 300:
        await grow(connect_as, settings, js, 4)
        first = first or max(await snapshots.positions(js), default=0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(projector.proc.wait(), 0.3)
    assert projector.proc.returncode == -9
    # The cut write has no entry: only the first snapshot is listed.
    assert first and await snapshots.positions(js) == [first]
    head = await grow(connect_as, settings, js, 4)
    await rebuild(js, tmp_path / "full.db")

    # The killed projector's file resumes from its tracking row, and a projector with no
    # file starts from the snapshot before the cut one; both reach the head alike.
    fresh = tmp_path / "fresh.db"
    with capture_logs() as logs:
        async with projecting(await connect_as("projector"), tuned(settings, every=1000), fresh) as again:
            await caught_up(again, head)
    assert next(e for e in logs if e["event"] == "projector_started")["from_snapshot"] == first
    async with projecting(await connect_as("projector"), tuned(settings, every=1000)) as resumed:
        await caught_up(resumed, head)
    assert await dump(settings.db_path) == await dump(fresh) == await dump(tmp_path / "full.db")


async def _sealed_log(connect_as: Connect, admin: Client, settings: Settings, count: int) -> None:
    """AUDIT made by hand (purgeable, as retention makes it) holding ``count`` chained records."""
    js = admin.jetstream()
    await js.add_stream(StreamConfig(name=subjects.AUDIT_STREAM, subjects=[subjects.AUDIT_ALL], allow_direct=True))
    await js.create_object_store(subjects.PROJECTION_BUCKET, config=projection_store_config(settings))
    router = (await connect_as("router")).jetstream()
    head = ChainHead()
    for seq in range(1, count + 1):
        event = TaskSubmitted(id=new_id(), task_id=f"t{seq}", skill="echo", input={"n": seq})
        record, data = chain.seal(AuditRecord(
            seq=seq, at=datetime.now(UTC), verdict="accepted", code="ok", reason="", principal="cli-alice",
            kind="task_submitted", key=f"t{seq}", msg_id=event.id, ingress_seq=seq, delivery=1, event=event), head.hash)
        await router.publish(subjects.audit("accepted", "task_submitted", f"t{seq}"), data)
        head = ChainHead(seq, record.hash)


async def test_a_projection_behind_audits_first_record_starts_from_a_snapshot_past_the_gap_or_names_it(
    connect_as: Connect, settings: Settings, tmp_path: Path
) -> None:
    admin = await connect_as("admin")  # not provisioned: AUDIT is made purgeable below
    await _sealed_log(connect_as, admin, settings, 6)
    js, writer = admin.jetstream(), (await connect_as("projector")).jetstream()
    for seq in (2, 3, 6):
        await rebuild(js, tmp_path / f"at{seq}.db", until_seq=seq)
    # Two projectors of a queue group saving the same position: the second writes nothing.
    saved = [await snapshots.write(writer, tmp_path / "at3.db", keep=3) for _ in range(2)]
    assert [s.existed for s in saved if s] == [False, True] and await snapshots.positions(js) == [3]
    await js.purge_stream(subjects.AUDIT_STREAM, seq=4)  # records 1..3 archived and purged

    with capture_logs() as logs:
        async with projecting(await connect_as("projector"), tuned(settings), tmp_path / "at2.db") as behind:
            await caught_up(behind, 6)
    assert [e for e in logs if e["event"] == "projection_behind_log"][0]["from_snapshot"] == 3
    [unverified] = [e for e in logs if e["event"] == "projection_snapshot_unverified"]
    assert "AUDIT starts at seq 4" in unverified["reason"]
    assert await dump(tmp_path / "at2.db") == await dump(tmp_path / "at6.db")

    # With no snapshot past the gap and no archive, the error names it, and a rebuild from seq 1 too.
    store = await writer.object_store(subjects.PROJECTION_BUCKET)
    await store.delete(snapshots.name_of(3))
    with pytest.raises(LogGapError, match=r"AUDIT starts at seq 4; this projection is at seq 0: records 1\.\.3 are"):
        async with projecting(await connect_as("projector"), tuned(settings), tmp_path / "new.db"):
            pass
    with pytest.raises(LogGapError, match=r"records 1\.\.3 left the stream and no archive is configured"):
        await rebuild(js, tmp_path / "full.db")
    assert not (tmp_path / "full.db").exists()
