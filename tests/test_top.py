"""``agentctl top``: the window's statistics from real audit records, and the dashboard
end to end against a real router and agent."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import msgspec
from nats.aio.client import Client
from rich.console import Console

from ledgerbus.agentctl.top import Stats, render
from ledgerbus.bus import subjects
from ledgerbus.bus.events import (
    Event,
    TaskCompleted,
    TaskDeadLettered,
    TaskFailed,
    TaskSubmitted,
    TaskUsage,
    kind_of,
    new_id,
)
from ledgerbus.bus.messages import Heartbeat
from ledgerbus.bus.records import AuditRecord, Verdict
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import Procs, agentctl, process_env, wait_for_record, wait_until

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_seq = iter(range(1, 1_000_000))


def record(at_s: float, event: Event, verdict: Verdict = "accepted", code: str = "ok", reason: str = "",
           principal: str = "agent-echo-1") -> AuditRecord:
    """An audit record as the router writes it, ``at_s`` seconds after T0."""
    seq = next(_seq)
    return AuditRecord(seq=seq, at=T0 + timedelta(seconds=at_s), verdict=verdict, code=code, reason=reason,
                       principal=principal, kind=kind_of(type(event)),
                       key=getattr(event, "task_id", "x"), msg_id=event.id, ingress_seq=seq, delivery=1, event=event)


def completed(at_s: float, task_id: str = "t") -> AuditRecord:
    return record(at_s, TaskCompleted(id=new_id(), task_id=task_id, attempt=1, output={}))


def failed(at_s: float, task_id: str, error: str = "boom", verdict: Verdict = "accepted") -> AuditRecord:
    return record(at_s, TaskFailed(id=new_id(), task_id=task_id, attempt=1, error=error), verdict=verdict,
                  code="ok" if verdict == "accepted" else "not_claimant")


def rejected(at_s: float, code: str) -> AuditRecord:
    return record(at_s, TaskSubmitted(id=new_id(), task_id=new_id(), skill="echo"), verdict="rejected", code=code,
                  reason=f"because {code}", principal="cli-alice")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# The statistics, fed real audit records


def test_counts_and_rates_cover_only_the_window_ending_now() -> None:
    stats = Stats(window_s=30)
    stats.add(record(0, TaskSubmitted(id=new_id(), task_id="a", skill="echo"), principal="cli-alice"))
    for t in (0, 30, 50, 58):
        stats.add(completed(t))

    snap = stats.snapshot(at(60))
    # 30 s back from 60 is 30: the record at exactly the window's start still counts.
    assert (snap.counts["completed"], snap.counts["submitted"]) == (3, 0)
    assert snap.per_second == 3 / 30
    assert snap.per_second_recent == 1 / 5  # only 58 is in the last 5 s

    snap = stats.snapshot(at(85))
    assert (snap.counts["completed"], snap.per_second_recent) == (1, 0)

    snap = stats.snapshot(at(200))
    assert snap.counts == {"submitted": 0, "completed": 0, "failed": 0, "dead_lettered": 0, "rejected": 0}
    assert (snap.per_second, snap.rejections, snap.failures) == (0, {}, [])
    assert snap.last_seq > 0, "the position in the log is kept when the window empties"


def test_rejections_are_counted_by_code_most_frequent_first_and_expire_with_the_window() -> None:
    stats = Stats(window_s=60)
    stats.add(rejected(1, "invalid_input"))
    for t in (10, 11, 12):
        stats.add(rejected(t, "skill_not_allowed"))
    stats.add(rejected(20, "rate_limited"))
    stats.add(rejected(21, "rate_limited"))
    # Accepted records with a code of their own are not rejections.
    stats.add(record(22, TaskSubmitted(id=new_id(), task_id="held", skill="sleep"), code="approval_requested",
                     principal="cli-alice"))

    snap = stats.snapshot(at(30))
    assert list(snap.rejections.items()) == [("skill_not_allowed", 3), ("rate_limited", 2), ("invalid_input", 1)]
    assert (snap.counts["rejected"], snap.counts["submitted"]) == (6, 1)

    snap = stats.snapshot(at(71))  # the window now starts at 11
    assert snap.rejections == {"rate_limited": 2, "skill_not_allowed": 2}


def test_recent_failures_are_the_newest_ten_newest_first_and_leave_with_the_window() -> None:
    stats = Stats(window_s=60)
    for i in range(12):
        stats.add(failed(i, f"f{i}", error=f"error {i}"))
    stats.add(failed(12, "late", verdict="rejected"))  # a report the router refused fails nothing
    stats.add(record(13, TaskDeadLettered(id=new_id(), task_id="dead", failures=3, reason="3 failures"),
                     principal="router"))
    stats.add(record(14, TaskUsage(id=new_id(), task_id="spent", attempt=1, tokens_in=500), code="budget_exceeded",
                     reason="600 tokens > 100", principal="agent-spender"))
    stats.add(record(15, TaskUsage(id=new_id(), task_id="cheap", attempt=1, tokens_in=5)))

    snap = stats.snapshot(at(20))
    assert [(f.task_id, f.kind) for f in snap.failures[:3]] == [
        ("spent", "budget_exceeded"), ("dead", "task_dead_lettered"), ("f11", "task_failed")]
    assert [f.task_id for f in snap.failures] == ["spent", "dead"] + [f"f{i}" for i in range(11, 3, -1)]
    assert (snap.failures[0].error, snap.failures[0].principal) == ("600 tokens > 100", "agent-spender")
    assert (snap.failures[1].error, snap.failures[2].error) == ("3 failures", "error 11")
    assert (snap.counts["failed"], snap.counts["dead_lettered"], snap.counts["rejected"]) == (13, 1, 1)

    snap = stats.snapshot(at(73.5))  # the window starts at 13.5: only the budget failure is left
    assert [f.task_id for f in snap.failures] == ["spent"]


def test_a_snapshot_lists_every_queue_and_the_agents_serving_it() -> None:
    beats = [
        Heartbeat(agent="b", instance="b-2", skills=["sleep"], concurrency=4, load=1, at=at(9), loads={"sleep": 1}),
        Heartbeat(agent="a", instance="a-1", skills=["echo", "sleep"], concurrency=2, load=2, at=at(8),
                  loads={"echo": 1, "sleep": 1}),
    ]
    snap = Stats(window_s=60).snapshot(at(10), beats, {"unserved": 3, "sleep": 2})
    data = json.loads(json.dumps(snap.as_json()))
    assert [(a["agent"], a["load"], a["concurrency"], a["heartbeat_age_s"]) for a in data["agents"]] == [
        ("a", 2, 2, 2.0), ("b", 1, 4, 1.0)]
    assert data["queues"] == {"echo": {"depth": 0, "running": 1, "instances": 1},
                              "sleep": {"depth": 2, "running": 2, "instances": 2},
                              "unserved": {"depth": 3, "running": 0, "instances": 0}}


def test_the_dashboard_prints_errors_and_names_as_text_not_markup() -> None:
    stats = Stats(window_s=60)
    stats.add(failed(1, "t1", error="KeyError: [/tmp/x] in [bold]step[/bold]\ntraceback line"))
    stats.add(rejected(2, "invalid_input"))
    console = Console(record=True, width=200)
    console.print(render(stats.snapshot(at(5)), problem="refresh failed: [/]"))
    text = console.export_text()
    assert "KeyError: [/tmp/x] in [bold]step[/bold]" in text and "traceback line" not in text
    assert "refresh failed: [/]" in text and "invalid_input" in text


# End to end: a router and an agent as subprocesses, agentctl top as a person runs it

POLICY = '[skills]\n"cli-*" = ["echo", "sleep", "unserved"]\n"agent-*" = ["*"]\n'
SECTIONS = ("Agents", "Queues", "Tasks (last 600s)", "Rejections", "Recent failures")


async def test_top_reports_agents_queues_outcomes_rejections_and_failures(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    settings.policy_path.write_text(POLICY)
    js = admin.jetstream()
    await procs.start("router", "router")
    await procs.start("sleeper-1", "agent", "--name", "sleeper-1", "--skills", "sleep", "--concurrency", "2")
    await wait_for_record(js, lambda r: r.kind == "agent_joined")

    code, _, err = await agentctl(settings, "submit", "sleep", "--input", '{"seconds": 0}', "--task-id", "done",
                                  "--wait")
    assert code == 0, err
    code, out, err = await agentctl(settings, "submit", "sleep", "--input", '{"seconds": 600}', "--task-timeout",
                                    "0.2", "--task-id", "broken", "--wait", "--json")
    assert code == 1, err
    broken = json.loads(out)
    assert broken["status"] == "failed"
    code, out, err = await agentctl(settings, "submit", "forbidden", "--task-id", "refused", "--wait", "--json")
    assert (code, json.loads(out)["code"]) == (1, "skill_not_allowed"), err
    code, _, err = await agentctl(settings, "submit", "unserved", "--task-id", "queued")
    assert code == 0, err
    code, _, err = await agentctl(settings, "submit", "sleep", "--input", '{"seconds": 3600}', "--task-id", "busy")
    assert code == 0, err

    # The long task reports progress from inside the running skill: from then on every
    # heartbeat counts it. Then wait for the heartbeat and the queued item to be there.
    await wait_for_record(js, lambda r: r.key == "busy" and r.kind == "task_progress")
    kv = await js.key_value(subjects.AGENTS_BUCKET)

    async def busy_heartbeat() -> bool:
        keys = await kv.keys()
        beats = [msgspec.json.decode((await kv.get(k)).value or b"{}", type=Heartbeat) for k in keys]
        return [(b.load, b.loads) for b in beats] == [(1, {"sleep": 1})]

    async def queued() -> bool:
        info = await js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.WORK_ALL)
        return (info.state.subjects or {}).get("work.unserved") == 1

    await wait_until(busy_heartbeat, what="a heartbeat with the busy task")
    await wait_until(queued, what="the unserved task on WORK")

    code, out, err = await agentctl(settings, "top", "--json", "--window", "600")
    assert code == 0, err
    snap = json.loads(out)
    [agent] = snap["agents"]
    assert (agent["agent"], agent["skills"], agent["load"], agent["concurrency"]) == ("sleeper-1", ["sleep"], 1, 2)
    assert snap["queues"] == {"sleep": {"depth": 1, "running": 1, "instances": 1},
                              "unserved": {"depth": 1, "running": 0, "instances": 0}}
    tasks = snap["tasks"]
    assert (tasks["submitted"], tasks["completed"], tasks["failed"], tasks["dead_lettered"], tasks["rejected"]) == (
        4, 1, 1, 0, 1)
    assert tasks["per_second"] == round(1 / 600, 3)
    assert snap["rejections"] == {"skill_not_allowed": 1}
    [failure] = snap["recent_failures"]
    assert (failure["task_id"], failure["kind"], failure["principal"], failure["error"]) == (
        "broken", "task_failed", "agent-sleeper-1", broken["error"])

    code, out, err = await agentctl(settings, "top", "--once", "--window", "600")
    assert code == 0, err
    for text in (*SECTIONS, "sleeper-1", "unserved", "skill_not_allowed", "broken"):
        assert text in out, f"{text!r} missing from:\n{out}"


async def test_the_live_dashboard_follows_the_log_and_ctrl_c_ends_it_cleanly(
    running_router: RunningRouter, connect_as: Callable[[str], Awaitable[Client]], admin: Client, settings: Settings
) -> None:
    # TTY_COMPATIBLE makes rich draw as on a terminal, so each screen shows as it is drawn.
    env = process_env(settings, LEDGERBUS_CLI_NAME="tester", TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="160")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.agentctl", "top", "--interval", "0.2", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    screen = b""

    async def shows(text: bytes) -> None:
        nonlocal screen
        while text not in screen:
            assert proc.stdout is not None and proc.stderr is not None
            chunk = await proc.stdout.read(4096)
            assert chunk, f"top ended before showing {text!r}: {(await proc.stderr.read()).decode()}"
            screen += chunk

    async with asyncio.timeout(60):
        await shows(b"Recent failures")
        cli = await connect_as("cli")
        await cli.jetstream().publish(subjects.ingress(subjects.principal("cli", "alice"), "task_submitted"),
                                      b"not json")
        rejection = await wait_for_record(admin.jetstream(), lambda r: not r.accepted)
        await shows(rejection.code.encode())  # a record appended after the first screen
        proc.send_signal(signal.SIGINT)
        rest, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"no live agents" in screen + rest


async def test_top_without_a_server_says_so_in_one_line(settings: Settings) -> None:
    env = process_env(settings, LEDGERBUS_URL="nats://127.0.0.1:1", LEDGERBUS_CONNECT_TIMEOUT_S="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.agentctl", "top", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 3
    assert out == b""
    assert err.decode().startswith("agentctl: cannot connect to nats://127.0.0.1:1") and err.count(b"\n") == 1
