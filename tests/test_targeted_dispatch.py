"""Work reaches the agent it was matched to (docs/orchestration.md, "Where work goes").

Through real processes: a step named by capabilities runs on the agent the match chose
and on no other agent with the skill; no identity can read another agent's queue; a
one-slot agent runs ready steps highest priority first; an agent whose heartbeat lapses
is recorded as gone and the work assigned to it is handed on; a subtask made by a
superseded attempt is cancelled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.runtime import Agent
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import (
    AgentLeft,
    PlanStep,
    PlanSubmitted,
    RetryPolicy,
    TaskCompleted,
    TaskDispatched,
    TaskStarted,
    TaskSubmitted,
    kind_of,
    new_id,
)
from ledgerbus.bus.messages import Heartbeat
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.router.live import LiveAgents
from ledgerbus.router.scheduler import Scheduler
from ledgerbus.router.state import RouterState
from tests.conftest import RunningRouter
from tests.snapshot_support import assert_snapshots_fold_alike
from tests.support import Procs, agentctl, audit_records, send, wait_for_record

Connect = Callable[[str], Awaitable[Client]]

PROFILES = """\
[profiles.frontend]
instructions = "You build web frontends."
skills = ["echo"]
capabilities = ["frontend", "react"]

[profiles.backend]
instructions = "You build HTTP APIs."
skills = ["echo"]
capabilities = ["backend", "flask"]
"""


def record(event: Any) -> AuditRecord:
    """An accepted record of ``event``, as the router folds it (for the scheduler unit test)."""
    return AuditRecord(seq=1, at=datetime.now(UTC), verdict="accepted", code="ok", reason="", principal="cli-tester",
                       kind=kind_of(type(event)), key=event.task_id, msg_id=event.id, ingress_seq=0, delivery=0,
                       event=event)


def accepted(records: list[AuditRecord], key: str, kind: str) -> list[AuditRecord]:
    return [r for r in records if r.key == key and r.kind == kind and r.accepted]


async def start_specialists(procs: Procs, settings: Settings, tmp_path: Path, admin: Client) -> None:
    """The router, a frontend and a backend specialist (profiles), and a generalist echo-1."""
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(PROFILES)
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    env = {"LEDGERBUS_PROFILES_PATH": str(profiles)}
    await procs.start("frontend", "agent", "--profile", "frontend", "--concurrency", "2", **env)
    await procs.start("backend", "agent", "--profile", "backend", "--concurrency", "2", **env)
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "8")
    kv = await admin.jetstream().key_value(subjects.AGENTS_BUCKET)
    async with asyncio.timeout(30):
        while {k.split(".")[0] for k in await _keys(kv)} < {"frontend", "backend", "echo-1"}:
            await asyncio.sleep(0.1)


async def _keys(kv: Any) -> list[str]:
    try:
        return list(await kv.keys())
    except Exception:  # noqa: BLE001 - no keys yet
        return []


async def test_agentctl_match_shows_the_candidates_and_a_step_runs_only_on_the_agent_the_match_chose(
    procs: Procs, settings: Settings, tmp_path: Path, connect_as: Connect, admin: Client
) -> None:
    await start_specialists(procs, settings, tmp_path, admin)
    # Before submitting: where a step would go, and why.
    code, out, err = await agentctl(settings, "match", "--capabilities", "frontend,react", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert [(c["agent"], c["skill"], c["score"]) for c in found["candidates"]] == [("frontend", "echo", 0.5)]
    code, out, err = await agentctl(settings, "match", "echo", "--json")
    assert code == 0, err
    # Any of the three serves echo; the generalist (echo only) fits it best.
    assert [c["agent"] for c in json.loads(out)["candidates"]] == ["echo-1", "backend", "frontend"]
    code, out, err = await agentctl(settings, "match", "--capabilities", "kubernetes")
    assert code == 1
    assert "no live agent provides kubernetes" in err
    assert "Traceback" not in err

    steps = [
        *(PlanStep(id=f"ui{i}", capabilities=["frontend", "react"], input={"i": i}) for i in range(4)),
        *(PlanStep(id=f"api{i}", capabilities=["backend"], input={"i": i}) for i in range(4)),
    ]
    await send(await connect_as("cli"), "cli", "tester", PlanSubmitted(id=new_id(), task_id="app", steps=steps))
    js = admin.jetstream()
    end = await wait_for_record(js, lambda r: r.key == "app" and r.kind in ("task_completed", "task_failed"), 60)
    assert end.kind == "task_completed"
    records = await audit_records(js)
    for step in steps:
        want = "frontend" if step.id.startswith("ui") else "backend"
        [dispatched] = accepted(records, f"app-{step.id}", "task_dispatched")
        event = dispatched.event
        assert isinstance(event, TaskDispatched)
        # frontend's echo provides {echo, text, frontend, react}: 2 of 4 needed; backend's 1 of 4.
        assert (event.agent, event.reason, event.score) == (want, "matched", 0.5 if want == "frontend" else 0.25)
        [done] = accepted(records, f"app-{step.id}", "task_completed")
        assert done.principal == f"agent-{want}", f"{step.id} ran on {done.principal}, matched to {want}"

    # The score, and where the step went, are in `tasks show`.
    code, out, err = await agentctl(settings, "tasks", "show", "app-ui0", env={"COLUMNS": "200"})
    assert code == 0, err
    assert "task_dispatched by router: to frontend (matched, score 0.5)" in out, out


async def test_no_agent_can_read_the_work_assigned_to_another(running_router: RunningRouter,
                                                               connect_as: Connect, admin: Client) -> None:
    nc = await connect_as("agent-echo-1")
    js = nc.jetstream(timeout=2)

    async def refused(name: str, filter_subject: str) -> None:
        """The create is a permissions violation (the server answers nothing, so the request
        times out), and no such consumer exists afterwards."""
        config = ConsumerConfig(name=name, durable_name=name, ack_policy=AckPolicy.EXPLICIT,
                                filter_subject=filter_subject)
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_consumer(subjects.WORK_STREAM, config=config)
        with pytest.raises(nats.js.errors.NotFoundError):
            await admin.jetstream().consumer_info(subjects.WORK_STREAM, name)

    await refused("assigned-frontend", subjects.assigned_all("frontend"))
    # Its own consumer's name, with another agent's filter: only the API subject that names
    # its own filter is allowed, and the server checks the body's filter against it.
    await refused("assigned-echo-1", subjects.assigned_all("frontend"))
    # A skill's shared queue under the name of another skill's consumer: refused the same way.
    await refused("skill-echo", subjects.work("shell"))
    # Its own queue, as the runtime makes it, is allowed.
    mine = ConsumerConfig(name="assigned-echo-1", durable_name="assigned-echo-1", ack_policy=AckPolicy.EXPLICIT,
                          filter_subject=subjects.assigned_all("echo-1"))
    await js.add_consumer(subjects.WORK_STREAM, config=mine)
    assert (await admin.jetstream().consumer_info(subjects.WORK_STREAM, "assigned-echo-1")).config.filter_subject \
        == "assign.echo-1.>"


async def test_a_claim_on_another_agents_work_and_saying_another_agent_left_are_refused_and_audited(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    agent = await connect_as("agent")  # the harness: may speak as any agent
    kv = await agent.jetstream().key_value(subjects.AGENTS_BUCKET)
    await kv.put(subjects.heartbeat_key("frontend", "i1"), codec.encode(Heartbeat(
        agent="frontend", instance="i1", skills=["echo"], concurrency=1, load=0, at=datetime.now(UTC))))
    await send(await connect_as("cli"), "cli", "tester",
               PlanSubmitted(id=new_id(), task_id="theirs", steps=[PlanStep(id="s", skill="echo")]))
    js = admin.jetstream()
    dispatched = await wait_for_record(js, lambda r: r.key == "theirs-s" and r.kind == "task_dispatched")
    assert isinstance(dispatched.event, TaskDispatched) and dispatched.event.agent == "frontend"
    # echo-1 was given echo, but the work is frontend's: refused before its token is looked at.
    await send(agent, "agent", "echo-1", TaskStarted(id=new_id(), task_id="theirs-s", attempt=1,
                                                      dispatch=dispatched.event.dispatch, token="guessed"))
    claim = await wait_for_record(js, lambda r: r.key == "theirs-s" and r.kind == "task_started")
    assert (claim.verdict, claim.code) == ("rejected", "not_assigned")
    assert "assigned to agent frontend, not agent-echo-1" in claim.reason
    # Only the router says that another agent left.
    await send(agent, "agent", "echo-1", AgentLeft(id=new_id(), instance="i1", agent="frontend",
                                                    reason="heartbeat_expired"))
    left = await wait_for_record(js, lambda r: r.kind == "agent_left" and r.principal == "agent-echo-1")
    assert (left.verdict, left.code) == ("rejected", "kind_not_allowed")
    assert "may not say that agent frontend left" in left.reason


async def test_a_one_slot_agent_runs_ready_steps_highest_priority_first(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    await procs.start("router", "router")
    await procs.start("sleeper-1", "agent", "--name", "sleeper-1", "--skills", "sleep", "--concurrency", "1")
    js = admin.jetstream()
    await wait_for_record(js, lambda r: r.kind == "agent_joined")
    # Step ids sort the other way from their priorities (the old code published by id).
    priorities = {"a": 1, "b": 3, "c": 5, "d": 7, "e": 9}
    steps = [PlanStep(id=sid, skill="sleep", input={"seconds": 0.2}, priority=p) for sid, p in priorities.items()]
    await send(await connect_as("cli"), "cli", "tester", PlanSubmitted(id=new_id(), task_id="prio", steps=steps))
    end = await wait_for_record(js, lambda r: r.key == "prio" and r.kind in ("task_completed", "task_failed"), 60)
    assert end.kind == "task_completed"
    records = await audit_records(js)
    started = [r.key.removeprefix("prio-") for r in records
               if r.accepted and r.kind == "task_started" and r.key.startswith("prio-")]
    assert started == ["e", "d", "c", "b", "a"]
    # One slot: a step is assigned only once the one before it has finished.
    for earlier, later in zip("edcb", "dcba", strict=True):
        assert accepted(records, f"prio-{earlier}", "task_completed")[0].seq < \
            accepted(records, f"prio-{later}", "task_dispatched")[0].seq


def test_a_waiting_step_gains_a_level_every_aging_period_so_its_wait_is_bounded() -> None:
    """Starvation is bounded: a priority-0 step that has waited 10 aging periods goes before
    priority-9 work that just became ready (its effective priority is 10)."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    live = LiveAgents(ttl_s=1e9)
    live.ready = True
    live.put("solo.i1", Heartbeat(agent="solo", instance="i1", skills=["sleep"], concurrency=1, load=0, at=now))
    scheduler = Scheduler(live, aging_s=30.0)
    state = RouterState()
    state.apply(record(PlanSubmitted(id="p1", task_id="old", steps=[PlanStep(id="s", skill="sleep", priority=0)])))
    state.apply(record(PlanSubmitted(id="p0", task_id="busy", steps=[PlanStep(id="s", skill="sleep", priority=5)])))
    [first] = [e for e in scheduler.decide(state, now) if isinstance(e, TaskDispatched)]
    assert first.task_id == "busy-s"  # the higher priority takes the one slot; "old" waits
    state.apply(record(first))
    later = now + timedelta(seconds=30 * 10)
    state.apply(record(PlanSubmitted(id="p2", task_id="new", steps=[PlanStep(id="s", skill="sleep", priority=9)])))
    assert not [e for e in scheduler.decide(state, later) if isinstance(e, TaskDispatched)]  # no free slot
    state.apply(record(TaskCompleted(id="c", task_id="busy-s", attempt=1, output=None)))
    [nxt] = [e for e in scheduler.decide(state, later) if isinstance(e, TaskDispatched)]
    assert nxt.task_id == "old-s", "a step that waited 10 aging periods must beat fresh priority-9 work"


async def test_an_agent_whose_heartbeat_lapses_is_recorded_gone_and_its_work_handed_on_at_once(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    first = await procs.start("agent-a", "agent", "--name", "agent-a", "--skills", "sleep")
    js = admin.jetstream()
    await wait_for_record(js, lambda r: r.kind == "agent_joined")
    plan = PlanSubmitted(id=new_id(), task_id="lapse", steps=[PlanStep(id="long", skill="sleep", input={"seconds": 30})])
    await send(await connect_as("cli"), "cli", "tester", plan)
    await wait_for_record(js, lambda r: r.key == "lapse-long" and r.kind == "task_started")
    await procs.start("agent-b", "agent", "--name", "agent-b", "--skills", "sleep")
    first.kill9()
    await first.proc.wait()
    killed = datetime.now(UTC)
    left = await wait_for_record(js, lambda r: r.kind == "agent_left" and r.key == "agent-a", 30)
    assert left.principal == "router"
    assert isinstance(left.event, AgentLeft)
    assert (left.event.reason, left.event.remaining) == ("heartbeat_expired", 0)
    handed = await wait_for_record(js, lambda r: r.key == "lapse-long" and r.kind == "task_dispatched"
                                   and r.event.reason == "reassigned", 30)  # type: ignore[union-attr]
    assert handed.event.agent == "agent-b"  # type: ignore[union-attr]
    # At once: within a TTL (plus a heartbeat) of the kill, long before AckWait x MaxDeliver
    # would have given up on the 30 s task.
    assert (handed.at - killed).total_seconds() < settings.agents_ttl_s + 3
    assert handed.seq > left.seq

    async def lost() -> dict[str, Any]:
        while True:
            code, out, _ = await agentctl(settings, "agents", "--json")
            rows = {a["name"]: a for a in json.loads(out)} if code == 0 else {}
            if rows.get("agent-a", {}).get("status") == "lost":
                return rows
            await asyncio.sleep(0.3)

    rows = await asyncio.wait_for(lost(), 30)
    assert rows["agent-b"]["status"] == "online"
    await agentctl(settings, "cancel", "lapse")  # agent-b stops the 30 s sleep: a quick teardown
    # The log this test made, at rest: a snapshot anywhere in it plus the tail folds alike.
    await procs.stop_all()
    await assert_snapshots_fold_alike(admin.jetstream(), settings)


class DelegateThenFail:
    """Submits a long subtask, then fails on its first attempt; completes on its second."""

    name = "delegate"
    description = "test: a subtask per attempt, the first attempt fails"

    def __init__(self) -> None:
        self.children: list[str] = []

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        self.children.append(await ctx.tasks.submit("sleep", {"seconds": 60}))
        if len(self.children) == 1:
            raise SkillError("first attempt fails after starting a subtask")
        return {"children": self.children}


async def test_a_subtask_made_by_a_superseded_attempt_is_cancelled(
    procs: Procs, connect_as: Connect, settings: Settings, admin: Client
) -> None:
    await procs.start("router", "router")
    await procs.start("projector", "projector")  # a skill's submit asks it for its verdict
    async with asyncio.timeout(30):
        while (await agentctl(settings, "tasks", "--json"))[0] != 0:
            await asyncio.sleep(0.2)
    stop = asyncio.Event()
    skill = DelegateThenFail()
    agent = asyncio.create_task(Agent(await connect_as("agent-delegator"), settings, "delegator",
                                      {"delegate": skill}).run(stop))
    try:
        js = admin.jetstream()
        await wait_for_record(js, lambda r: r.kind == "agent_joined")
        await send(await connect_as("cli"), "cli", "tester", TaskSubmitted(
            id=new_id(), task_id="parent", skill="delegate",
            retry=RetryPolicy(max_attempts=2, backoff_s=0.1)))
        end = await wait_for_record(js, lambda r: r.key == "parent" and r.kind in ("task_completed", "task_dead_lettered"), 30)
        assert end.kind == "task_completed", [(r.kind, r.key, r.code, r.reason, getattr(r.event, "error", ""))
                                              for r in await audit_records(js)]
        first, second = skill.children
        cancel = await wait_for_record(js, lambda r: r.key == first and r.kind == "task_cancelled", 10)
        assert "superseded" in cancel.event.reason  # type: ignore[union-attr]
        records = await audit_records(js)
        assert not accepted(records, second, "task_cancelled"), "the current attempt's subtask must stay"
    finally:
        stop.set()
        await agent
    # The log this test made, at rest: a snapshot anywhere in it plus the tail folds alike.
    await procs.stop_all()
    await assert_snapshots_fold_alike(admin.jetstream(), settings)
