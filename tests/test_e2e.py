"""End to end with every process real: nats-server, router, projector and agents as
subprocesses, and agentctl run as a person would run it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats.errors
from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import TaskCompleted
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.rebuild import rebuild
from tests.support import Procs, agentctl, audit_records, wait_for_record, wait_until


def joined(name: str):  # type: ignore[no-untyped-def]
    return lambda r: r.accepted and r.kind == "agent_joined" and r.principal == f"agent-{name}"


async def start_system(procs: Procs, admin: Client, *agents: tuple[str, str]) -> None:
    """Router, projector and the named agents; returns once every agent has joined."""
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    for name, skills in agents:
        await procs.start(name, "agent", "--name", name, "--skills", skills, "--concurrency", "2")
    for name, _ in agents:
        await wait_for_record(admin.jetstream(), joined(name))


async def submit_until_started(settings: Settings, admin: Client, skill: str, input_json: str) -> str:
    """Submit with agentctl (no --wait) and return the task id once an agent has claimed it."""
    code, out, err = await agentctl(settings, "submit", skill, "--input", input_json, "--json")
    assert code == 0, err
    task_id: str = json.loads(out)["task_id"]
    await wait_for_record(admin.jetstream(), lambda r: r.key == task_id and r.kind == "task_started")
    return task_id


async def projected(admin: Client, task_id: str, status: str = "completed") -> dict:
    """Wait until the projector's query service shows ``task_id`` in ``status``; return it."""
    found: dict = {}

    async def ready() -> bool:
        try:
            msg = await admin.request(subjects.query("tasks", "get"), codec.encode({"task_id": task_id}), timeout=5)
        except nats.errors.NoRespondersError:
            return False  # the projector is still starting
        reply = json.loads(msg.data)
        if reply.get("ok") and reply["data"]["status"] == status:
            found.update(reply["data"])
            return True
        return False

    await wait_until(ready, what=f"task {task_id} {status} in the projection")
    return found


async def test_submit_wait_json_returns_the_completed_task_with_echoed_output(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    await start_system(procs, admin, ("echo-1", "echo"))
    code, out, err = await agentctl(settings, "submit", "echo", "--input", '{"text":"hello"}', "--wait", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["status"], result["output"], result["agent"], result["attempts"]) == (
        "completed", {"text": "hello"}, "echo-1", 1)
    task_id = result["task_id"]

    await projected(admin, task_id)
    code, out, err = await agentctl(settings, "tasks", "--json")
    assert code == 0, err
    [row] = [t for t in json.loads(out) if t["task_id"] == task_id]
    assert (row["status"], row["skill"], row["output"], row["submitted_by"]) == (
        "completed", "echo", {"text": "hello"}, "cli-tester")

    history = [r for r in await audit_records(admin.jetstream()) if r.key == task_id]
    # echo finishes before its claim is due (claim_first = False): its result carries the
    # claim, one message and one record for both; the record keeps the token's fingerprint.
    assert [(r.kind, r.verdict) for r in history] == [("task_submitted", "accepted"), ("task_completed", "accepted")]
    done = history[1].event
    assert isinstance(done, TaskCompleted) and done.claim is not None and done.claim.dispatch == 1
    assert done.claim.token.startswith("sha256:")
    assert len({r.trace_id for r in history}) == 1 and history[0].trace_id, "one trace follows the task"

    code, out, _ = await agentctl(settings, "events", "--task", task_id, "--json")
    assert code == 0
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [r.seq for r in history]


async def test_an_agent_started_before_the_router_waits_for_its_streams_and_buckets_then_joins(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    # honcho starts every process at once: the router provisions the streams, then the
    # buckets, and an agent must not exit on whichever is not there yet. Caught between the
    # two: WORK is there (the admin fixture provisioned everything), the agents bucket not.
    await admin.jetstream().delete_key_value(subjects.AGENTS_BUCKET)
    agent = await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo")
    await asyncio.sleep(3.0)  # long enough for it to start, connect and look for the bucket
    assert agent.proc.returncode is None, "the agent gave up before the router provisioned its bucket"
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    await wait_for_record(admin.jetstream(), joined("echo-1"))
    code, out, err = await agentctl(settings, "submit", "echo", "--input", '{"n": 1}', "--wait", "--json")
    assert code == 0 and json.loads(out)["output"] == {"n": 1}, err


async def test_exit_codes_say_failed_rejected_and_timed_out(procs: Procs, admin: Client, settings: Settings) -> None:
    await start_system(procs, admin, ("sleeper-1", "sleep"))
    code, out, err = await agentctl(settings, "submit", "sleep", "--input", '{"seconds":"soon"}', "--wait", "--json")
    assert code == 1, err
    # The skill declares its input type: the router rejects the task before anything runs.
    result = json.loads(out)
    assert (result["status"], result["code"]) == ("rejected", "invalid_input")
    assert "sleep's schema: expected float, got str - at `$.seconds`" in result["reason"]

    code, _, err = await agentctl(settings, "submit", "sleep", "--input", '{"seconds":0}', "--task-id", "dup", "--wait")
    assert code == 0, err
    code, out, err = await agentctl(settings, "submit", "sleep", "--task-id", "dup", "--wait", "--json")
    assert code == 1
    assert (json.loads(out)["status"], json.loads(out)["code"]) == ("rejected", "duplicate_task")

    code, out, err = await agentctl(settings, "submit", "nobody-has-this", "--wait", "--timeout", "1")
    assert code == 2
    # It says where the task was when the wait ended (COLUMNS may wrap the line: xdist sets 80).
    assert "timed out" in err and "last state: pending; no agent serves nobody-has-this" in " ".join(err.split()), err

    code, _, err = await agentctl(settings, "submit", "echo", "--input", "[1, 2]")
    assert code == 2 and "must be a JSON object" in err


async def test_an_agent_killed_mid_task_loses_nothing_and_the_task_completes_once(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    js = admin.jetstream()
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    doomed = await procs.start("agent-a", "agent", "--name", "agent-a", "--skills", "sleep")
    await wait_for_record(js, joined("agent-a"))
    # Long enough that agent-b starts and joins before it ends, on a loaded machine too
    # (with 3 s, agent-a once finished first under the full suite).
    task_id = await submit_until_started(settings, admin, "sleep", '{"seconds": 8}')
    await procs.start("agent-b", "agent", "--name", "agent-b", "--skills", "sleep")
    await wait_for_record(js, joined("agent-b"))

    doomed.kill9()

    done: AuditRecord = await wait_for_record(js, lambda r: r.key == task_id and r.kind == "task_completed",
                                              timeout=60)
    assert (done.accepted, done.principal) == (True, "agent-agent-b")
    task = await projected(admin, task_id)
    assert (task["agent"], task["attempts"]) == ("agent-b", 2)
    history = [r for r in await audit_records(js) if r.key == task_id]
    assert [r.kind for r in history if r.accepted].count("task_completed") == 1
    assert [(r.principal, r.event.attempt) for r in history if r.kind == "task_started"] == [  # type: ignore[union-attr]
        ("agent-agent-a", 1), ("agent-agent-b", 2)]


async def test_a_restarted_projector_catches_up_without_applying_anything_twice(
    procs: Procs, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    js = admin.jetstream()
    await procs.start("router", "router")
    projector = await procs.start("projector", "projector")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "4")
    await wait_for_record(js, joined("echo-1"))
    first = [json.loads((await agentctl(settings, "submit", "echo", "--wait", "--json"))[1])["task_id"]
             for _ in range(2)]
    await projected(admin, first[-1])

    projector.kill9()
    later = [json.loads((await agentctl(settings, "submit", "echo", "--input", f'{{"n":{i}}}', "--wait",
                                        "--json"))[1])["task_id"] for i in range(4)]
    await procs.start("projector", "projector")
    for task_id in later:
        await projected(admin, task_id)

    live = await dbmod.open_db(settings.db_path)
    try:
        head = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
        await wait_until(lambda: _at(live, head), what="projector at the head")
        tasks = {row[0]: row for row in (await dbmod.dump(live))["tasks"]}
        assert set(tasks) == set(first + later)
        async with live.execute("SELECT attempts, status FROM tasks") as cur:
            assert {tuple(r) for r in await cur.fetchall()} == {(1, "completed")}
        async with live.execute("SELECT tasks_completed FROM agents WHERE name = 'echo-1'") as cur:
            assert tuple(await cur.fetchone() or ()) == (6,)
        assert await rebuild(js, tmp_path / "rebuilt.db") == head
        rebuilt = await dbmod.open_db(tmp_path / "rebuilt.db")
        try:
            assert await dbmod.dump(rebuilt) == await dbmod.dump(live)
        finally:
            await rebuilt.close()
    finally:
        await live.close()


async def _at(db, seq: int) -> bool:  # type: ignore[no-untyped-def]
    return await dbmod.position(db) >= seq


async def test_sigterm_drains_an_agent_it_finishes_its_task_then_leaves(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    js = admin.jetstream()
    await procs.start("router", "router")
    agent = await procs.start("sleeper-1", "agent", "--name", "sleeper-1", "--skills", "sleep")
    await wait_for_record(js, joined("sleeper-1"))
    task_id = await submit_until_started(settings, admin, "sleep", '{"seconds": 1.5}')

    assert await agent.stop() == 0

    records = await audit_records(js)
    done = [r for r in records if r.key == task_id and r.kind == "task_completed"]
    left = [r for r in records if r.kind == "agent_left"]
    assert len(done) == 1 and done[0].accepted and done[0].principal == "agent-sleeper-1"
    assert len(left) == 1 and left[0].seq > done[0].seq


async def test_read_commands_show_a_task_its_history_and_live_agents(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    await start_system(procs, admin, ("echo-1", "echo"))
    code, out, err = await agentctl(settings, "submit", "echo", "--input", '{"n": 7}', "--wait", "--json")
    assert code == 0, err
    task_id = json.loads(out)["task_id"]
    await projected(admin, task_id)

    code, out, err = await agentctl(settings, "tasks", "show", task_id, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["status"], shown["output"], shown["agent"]) == ("completed", {"n": 7}, "echo-1")
    assert [h["kind"] for h in shown["history"]] == ["task_submitted", "task_completed"]

    code, out, err = await agentctl(settings, "agents", "--json")
    assert code == 0, err
    [agent] = json.loads(out)
    assert (agent["name"], agent["status"], agent["skills"], agent["replicas"], agent["tasks_completed"]) == (
        "echo-1", "online", ["echo"], 1, 1)
    assert agent["last_heartbeat"]

    for args in (["tasks"], ["tasks", "show", task_id], ["agents"], ["events"]):
        code, out, err = await agentctl(settings, *args)
        assert code == 0, err
        assert ("echo-1" in out) and not err.strip(), args

    code, out, err = await agentctl(settings, "tasks", "show", "no-such-task")
    assert code == 2 and err.strip() == "agentctl: no task no-such-task: neither the projection nor the audit log knows it"
