"""Plans across real processes: the six-task plan's waves, kill -9 of the router in the
middle of a 50-step plan, and kill -9 of an agent replica in the middle of a step."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from ledgerbus.bus.events import PlanStep, PlanSubmitted, new_id
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from tests.snapshot_support import assert_snapshots_fold_alike
from tests.support import Procs, agentctl, audit_records, send, wait_for_record

Connect = Callable[[str], Awaitable[Client]]

SIX_TASK_PLAN = """\
name: two services
steps:
  - {id: setup_a, skill: sleep, input: {seconds: 0.6}}
  - {id: setup_b, skill: sleep, input: {seconds: 0.6}}
  - {id: install_a, skill: sleep, input: {seconds: 0.6}, deps: [setup_a]}
  - {id: install_b, skill: sleep, input: {seconds: 0.6}, deps: [setup_b]}
  - {id: test_a, skill: sleep, input: {seconds: 0.6}, deps: [install_a]}
  - {id: test_b, skill: sleep, input: {seconds: 0.6}, deps: [install_b]}
"""


def accepted(records: list[AuditRecord], key: str, kind: str) -> list[AuditRecord]:
    return [r for r in records if r.key == key and r.kind == kind and r.accepted]


async def test_the_six_task_plan_runs_in_three_waves(procs: Procs, settings: Settings, tmp_path: Path,
                                                     admin: Client) -> None:
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    await procs.start("sleeper-1", "agent", "--name", "sleeper-1", "--skills", "sleep", "--concurrency", "4")
    plan = tmp_path / "six.yaml"
    plan.write_text(SIX_TASK_PLAN)
    code, out, err = await agentctl(settings, "submit", "--plan", str(plan), "--task-id", "six", "--wait", "--json",
                                    timeout=60)
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "completed"
    assert set(result["output"]["outputs"]) == {"setup_a", "setup_b", "install_a", "install_b", "test_a", "test_b"}
    assert all(s["status"] == "completed" and s["attempts"] == 1 for s in result["steps"].values())

    records = await audit_records(admin.jetstream())

    def span(step: str) -> tuple[int, int, float, float]:
        started = accepted(records, f"six-{step}", "task_started")[0]
        done = accepted(records, f"six-{step}", "task_completed")[0]
        return started.seq, done.seq, started.at.timestamp(), done.at.timestamp()

    waves = [("setup_a", "setup_b"), ("install_a", "install_b"), ("test_a", "test_b")]
    # Each step starts only after the step it depends on completed (the log's order)...
    for earlier, later in itertools.pairwise(waves):
        for a, b in zip(earlier, later, strict=True):
            assert span(a)[1] < span(b)[0], (a, b)
    # ...and the two steps of each wave ran at the same time.
    for a, b in waves:
        _, _, a_start, a_end = span(a)
        _, _, b_start, b_end = span(b)
        assert a_start < b_end and b_start < a_end, f"{a} and {b} did not overlap"
    # Waves: both setups started before either install did, and so on.
    for earlier, later in itertools.pairwise(waves):
        assert max(span(s)[0] for s in earlier) < min(span(s)[0] for s in later)

    # `tasks show` draws the plan as a tree of its steps (from the projection).
    async def projected() -> dict[str, Any]:
        while True:
            code, out, _ = await agentctl(settings, "tasks", "show", "six", "--json")
            if code == 0 and (task := json.loads(out))["status"] == "completed":
                return task  # type: ignore[no-any-return]
            await asyncio.sleep(0.2)

    task = await asyncio.wait_for(projected(), 30)
    assert [(c["step"], c["status"], c["deps"]) for c in task["children"]] == [
        ("setup_a", "completed", []), ("setup_b", "completed", []), ("install_a", "completed", ["setup_a"]),
        ("install_b", "completed", ["setup_b"]), ("test_a", "completed", ["install_a"]),
        ("test_b", "completed", ["install_b"]),
    ]
    code, out, _ = await agentctl(settings, "tasks", "show", "six")
    assert code == 0
    assert "subtasks" in out
    for step in ("setup_a", "install_b", "test_a"):
        assert any(line.strip().endswith("s") and f"{step} sleep completed on sleeper-1" in line
                   for line in out.splitlines()), out
    # The log this test made, at rest: a snapshot anywhere in it plus the tail folds alike.
    await procs.stop_all()
    await assert_snapshots_fold_alike(admin.jetstream(), settings)


async def test_killing_the_router_mid_plan_loses_nothing_and_repeats_nothing(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    router = await procs.start("router", "router")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "4")
    # Ten chains of five steps: a wide and deep plan, 50 steps.
    steps = [
        PlanStep(id=f"c{c}s{s}", skill="echo", input={"chain": c, "step": s}, deps=[f"c{c}s{s - 1}"] if s else [])
        for c in range(10) for s in range(5)
    ]
    await send(await connect_as("cli"), "cli", "alice", PlanSubmitted(id=new_id(), task_id="big", steps=steps))
    js = admin.jetstream()
    # Kill it once some steps have completed and others have not been dispatched yet.
    await wait_for_record(js, lambda r: r.kind == "task_completed" and r.key.endswith("s1"))
    router.kill9()
    await router.proc.wait()
    at_kill = await audit_records(js)
    before = len(at_kill)
    assert not accepted(at_kill, "big", "task_completed"), "the plan ended before the kill"
    await procs.start("router", "router")
    end = await wait_for_record(js, lambda r: r.key == "big" and r.kind in ("task_completed", "task_failed"), 60)
    assert end.kind == "task_completed"
    records = await audit_records(js)
    assert len(records) > before  # the second router did the rest
    for step in steps:
        key = f"big-{step.id}"
        assert len(accepted(records, key, "task_dispatched")) == 1, key
        assert len(accepted(records, key, "task_completed")) == 1, key
    assert len(accepted(records, "big", "task_completed")) == 1
    assert len(end.event.output["outputs"]) == 50  # type: ignore[union-attr]
    code, out, _ = await agentctl(settings, "audit", "verify", "--no-projections", "--json")
    assert code == 0, out


async def test_a_step_whose_agent_dies_is_redelivered_to_another_replica_and_completes_once(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    await procs.start("router", "router")
    first = await procs.start("agent-a", "agent", "--name", "agent-a", "--skills", "sleep")
    js = admin.jetstream()
    await wait_for_record(js, lambda r: r.kind == "agent_joined")
    # Two replicas of one agent: the step is assigned to the agent, so either may run it.
    # (An agent with no replica left has its work handed on to another agent instead:
    # tests/test_targeted_dispatch.py.)
    plan = PlanSubmitted(id=new_id(), task_id="doomed", steps=[
        PlanStep(id="long", skill="sleep", input={"seconds": 2}),
        PlanStep(id="then", skill="sleep", input={"seconds": 0}, deps=["long"]),
    ])
    await send(await connect_as("cli"), "cli", "alice", plan)
    await wait_for_record(js, lambda r: r.key == "doomed-long" and r.kind == "task_started")
    await procs.start("agent-a-2", "agent", "--name", "agent-a", "--skills", "sleep")
    first.kill9()
    await first.proc.wait()
    end = await wait_for_record(js, lambda r: r.key == "doomed" and r.kind in ("task_completed", "task_failed"), 60)
    assert end.kind == "task_completed"
    records = await audit_records(js)
    claims = accepted(records, "doomed-long", "task_started")
    assert [(c.principal, c.event.attempt) for c in claims] == [("agent-agent-a", 1), ("agent-agent-a", 2)]  # type: ignore[union-attr]
    assert claims[0].event.id != claims[1].event.id  # type: ignore[union-attr]
    assert len(accepted(records, "doomed-long", "task_completed")) == 1
    assert len(accepted(records, "doomed-long", "task_dispatched")) == 1  # redelivery, not a retry
    assert Counter(r.key for r in records if r.kind == "task_completed" and r.accepted) == {
        "doomed-long": 1, "doomed-then": 1, "doomed": 1,
    }


async def test_a_task_whose_claimants_all_die_is_dead_lettered_after_max_deliver(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    await procs.start("router", "router")
    js = admin.jetstream()
    plan = PlanSubmitted(id=new_id(), task_id="cursed", steps=[
        PlanStep(id="hang", skill="sleep", input={"seconds": 60}),
        PlanStep(id="never", skill="sleep", input={"seconds": 0}, deps=["hang"]),
    ])
    await send(await connect_as("cli"), "cli", "alice", plan)
    # Every claimant is a replica of one agent (the step is assigned to it): each dies
    # after its claim, the next replica already up, so the agent never leaves (an agent
    # with no replica left would have its work handed on instead).
    agent = await procs.start("sleeper-1", "agent", "--name", "sleeper-1", "--skills", "sleep",
                              LEDGERBUS_WORK_MAX_DELIVER="2")
    for attempt in (1, 2):
        await wait_for_record(js, lambda r, n=attempt: r.key == "cursed-hang" and r.kind == "task_started"
                              and r.accepted and r.event.attempt == n)  # type: ignore[union-attr]
        following = await procs.start(f"sleeper-1-{attempt + 1}", "agent", "--name", "sleeper-1", "--skills",
                                      "sleep", LEDGERBUS_WORK_MAX_DELIVER="2")
        agent.kill9()
        await agent.proc.wait()
        agent = following
    # JetStream gives up on the message when it would deliver it a third time: to the
    # replica now asking for work.
    dead = await wait_for_record(js, lambda r: r.key == "cursed-hang" and r.kind == "task_dead_lettered", 30)
    assert dead.principal == "router"
    assert dead.event.reason.startswith("no result after 2 deliveries (MaxDeliver)")  # type: ignore[union-attr]
    end = await wait_for_record(js, lambda r: r.key == "cursed" and r.kind == "task_failed")
    assert end.event.error.startswith("step hang dead_lettered: no result after 2 deliveries")  # type: ignore[union-attr]
    assert (await js.stream_info("WORK")).state.messages == 0  # the dead message left WORK
    records = await audit_records(js)
    assert not [r for r in records if r.key == "cursed-hang" and r.kind == "task_started" and r.event.attempt > 2]  # type: ignore[union-attr]
    assert not [r for r in records if r.key == "cursed-never" and r.kind == "task_dispatched"]
    # The log this test made, at rest: a snapshot anywhere in it plus the tail folds alike.
    await procs.stop_all()
    await assert_snapshots_fold_alike(admin.jetstream(), settings)
