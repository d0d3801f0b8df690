"""Plans: DAG scheduling by the router, context passing, retries and dead letters, failure
policies, validation before dispatch, and cancellation.

Agents here run in the test's event loop with test skills (a skill that returns what it
was given, one that always fails); the subprocess tests in test_orchestration_e2e.py
kill processes mid-plan.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.runtime import Agent
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus.events import PlanStep, PlanSubmitted, RetryPolicy, TaskCancelled, TaskSubmitted, new_id
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import agentctl, audit_records, send, wait_for_record

Connect = Callable[[str], Awaitable[Client]]


class ContextSkill:
    """Returns the step id and exactly the context it was given."""

    name = "echo"
    description = "test: what the step saw"

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        return {"step": ctx.step, "context": ctx.context, "input": input}


class FailSkill:
    """Always fails."""

    name = "sleep"
    description = "test: always fails"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        self.runs += 1
        if input.get("seconds"):
            await asyncio.sleep(input["seconds"])
            return {"slept": input["seconds"]}
        raise SkillError(f"boom {self.runs}")


@pytest.fixture
async def agents(
    running_router: RunningRouter, connect_as: Connect, settings: Settings
) -> AsyncIterator[FailSkill]:
    """An echo agent (ContextSkill) and a sleep agent (FailSkill), in this event loop."""
    stop = asyncio.Event()
    fail = FailSkill()
    tasks = [
        asyncio.create_task(Agent(await connect_as("agent-echo-1"), settings, "echo-1", {"echo": ContextSkill()},
                                  concurrency=4).run(stop)),
        asyncio.create_task(Agent(await connect_as("agent-sleeper-1"), settings, "sleeper-1", {"sleep": fail},
                                  concurrency=4).run(stop)),
    ]
    yield fail
    stop.set()
    await asyncio.gather(*tasks)


def by_key(records: list[AuditRecord], key: str, kind: str | None = None) -> list[AuditRecord]:
    return [r for r in records if r.key == key and r.accepted and (kind is None or r.kind == kind)]


async def plan_end(admin: Client, plan_id: str, timeout: float = 30.0) -> AuditRecord:
    return await wait_for_record(
        admin.jetstream(),
        lambda r: r.key == plan_id and (r.kind in ("task_completed", "task_failed") or not r.accepted),
        timeout,
    )


async def test_a_step_sees_exactly_its_dependencies_outputs(agents: FailSkill, connect_as: Connect, admin: Client) -> None:
    plan = PlanSubmitted(id=new_id(), task_id="ctx", steps=[
        PlanStep(id="a", skill="echo", input={"n": 1}),
        PlanStep(id="b", skill="echo", input={"n": 2}),
        PlanStep(id="unrelated", skill="echo", input={"n": 3}),
        PlanStep(id="c", skill="echo", input={"n": 4}, deps=["a", "b"]),
    ])
    await send(await connect_as("cli"), "cli", "alice", plan)
    end = await plan_end(admin, "ctx")
    assert end.kind == "task_completed", end
    outputs = end.event.output["outputs"]  # type: ignore[union-attr]
    assert outputs["c"]["context"] == {"a": outputs["a"], "b": outputs["b"]}
    assert outputs["a"] == {"step": "a", "context": {}, "input": {"n": 1}}
    assert end.event.output["failed"] == {}  # type: ignore[union-attr]
    records = await audit_records(admin.jetstream())
    # c was dispatched only after both of its dependencies completed.
    dispatched_c = by_key(records, "ctx-c", "task_dispatched")[0].seq
    assert all(by_key(records, f"ctx-{d}", "task_completed")[0].seq < dispatched_c for d in ("a", "b"))


async def test_priority_orders_the_dispatch_of_ready_steps(agents: FailSkill, connect_as: Connect, admin: Client) -> None:
    steps = [PlanStep(id=f"s{p}", skill="echo", priority=p) for p in (3, 9, 0, 5)]
    await send(await connect_as("cli"), "cli", "alice", PlanSubmitted(id=new_id(), task_id="prio", steps=steps))
    await plan_end(admin, "prio")
    records = await audit_records(admin.jetstream())
    order = [r.key for r in records if r.kind == "task_dispatched"]
    assert order == ["prio-s9", "prio-s5", "prio-s3", "prio-s0"]


async def test_a_failing_step_is_retried_then_dead_lettered_and_fails_the_plan(
    agents: FailSkill, connect_as: Connect, admin: Client
) -> None:
    plan = PlanSubmitted(id=new_id(), task_id="flaky", steps=[
        PlanStep(id="bad", skill="sleep", retry=RetryPolicy(max_attempts=3, backoff_s=0.1)),
        PlanStep(id="after", skill="echo", deps=["bad"]),
        PlanStep(id="slow", skill="sleep", input={"seconds": 30}),
    ])
    await send(await connect_as("cli"), "cli", "alice", plan)
    end = await plan_end(admin, "flaky")
    assert end.kind == "task_failed"
    assert end.event.error.startswith("step bad dead_lettered: failed 3 of 3 attempts; last error: boom")  # type: ignore[union-attr]
    records = await audit_records(admin.jetstream())
    kinds = [r.kind for r in by_key(records, "flaky-bad")]
    assert kinds == [
        "task_dispatched", "task_started", "task_failed", "task_retry_scheduled",
        "task_dispatched", "task_started", "task_failed", "task_retry_scheduled",
        "task_dispatched", "task_started", "task_failed", "task_dead_lettered",
    ]
    assert [r.event.dispatch for r in by_key(records, "flaky-bad", "task_dispatched")] == [1, 2, 3]  # type: ignore[union-attr]
    assert [r.event.attempt for r in by_key(records, "flaky-bad", "task_started")] == [1, 2, 3]  # type: ignore[union-attr]
    assert agents.runs == 3 + 1  # three tries of bad, and slow has started
    # The failed plan cancels what is left: the running step and the one that never ran.
    await wait_for_record(admin.jetstream(), lambda r: r.key == "flaky-after" and r.kind == "task_cancelled")
    await wait_for_record(admin.jetstream(), lambda r: r.key == "flaky-slow" and r.kind == "task_cancelled")
    records = await audit_records(admin.jetstream())
    assert not by_key(records, "flaky-after", "task_dispatched")
    assert not by_key(records, "flaky-slow", "task_completed")


async def test_continue_marks_the_failure_skips_its_dependents_and_completes_the_plan(
    agents: FailSkill, connect_as: Connect, admin: Client
) -> None:
    plan = PlanSubmitted(id=new_id(), task_id="lenient", steps=[
        PlanStep(id="lint", skill="sleep", on_failure="continue"),
        PlanStep(id="report", skill="echo", deps=["lint"]),
        PlanStep(id="build", skill="echo"),
        PlanStep(id="ship", skill="echo", deps=["build"]),
    ])
    await send(await connect_as("cli"), "cli", "alice", plan)
    end = await plan_end(admin, "lenient")
    assert end.kind == "task_completed"
    output = end.event.output  # type: ignore[union-attr]
    assert set(output["outputs"]) == {"build", "ship"}
    assert output["failed"] == {
        "lint": {"status": "failed", "error": "boom 1"},
        "report": {"status": "skipped", "error": "skipped: step lint failed"},
    }


async def test_bad_plans_are_rejected_before_anything_is_dispatched(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    bad = {
        "cycle": [PlanStep(id="a", skill="echo", deps=["c"]), PlanStep(id="b", skill="echo", deps=["a"]),
                  PlanStep(id="c", skill="echo", deps=["b"])],
        "dangling": [PlanStep(id="a", skill="echo", deps=["ghost"])],
        "unknown": [PlanStep(id="a", skill="echo"), PlanStep(id="b", skill="no-such-skill", deps=["a"])],
        "both": [PlanStep(id="a", skill="echo", capabilities=["text"])],
        "twice": [PlanStep(id="a", skill="echo"), PlanStep(id="a", skill="echo")],
    }
    for plan_id, steps in bad.items():
        await send(cli, "cli", "alice", PlanSubmitted(id=new_id(), task_id=plan_id, steps=steps))
    await wait_for_record(admin.jetstream(), lambda r: r.key == "twice")
    records = await audit_records(admin.jetstream())
    reasons = {r.key: (r.verdict, r.code, r.reason) for r in records}
    assert reasons["cycle"] == ("rejected", "bad_plan", "dependency cycle: a -> c -> b -> a")
    assert reasons["dangling"] == ("rejected", "bad_plan", "step 'a' depends on 'ghost', which is not a step of this plan")
    assert reasons["unknown"][:2] == ("rejected", "bad_plan")
    assert reasons["unknown"][2].startswith("step 'b' names unknown skill 'no-such-skill' (known: ")
    assert reasons["both"] == ("rejected", "bad_plan", "step 'a' must name either a skill or capabilities, not both")
    assert reasons["twice"] == ("rejected", "bad_plan", "step id 'a' is used twice")
    assert not [r for r in records if r.kind == "task_dispatched"]
    # The router lives on: a good plan after the bad ones runs.


async def test_the_cli_reports_a_bad_plan_file_without_sending_it(settings: Settings, tmp_path: Path) -> None:
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("steps:\n  - {id: a, skill: echo, deps: [b]}\n  - {id: b, skill: echo, deps: [a]}\n")
    code, _, err = await agentctl(settings, "submit", "--plan", str(cyclic))
    assert code == 2
    assert "dependency cycle: a -> b -> a" in err
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"steps": [{"id": "a", "skil": "echo"}]}))
    code, _, err = await agentctl(settings, "submit", "--plan", str(typo))
    assert code == 2
    assert "skil" in err and "Traceback" not in err


async def test_cancel_stops_the_running_step_and_nothing_pending_runs_afterwards(
    agents: FailSkill, connect_as: Connect, admin: Client
) -> None:
    plan = PlanSubmitted(id=new_id(), task_id="long", steps=[
        PlanStep(id="slow", skill="sleep", input={"seconds": 30}),
        PlanStep(id="next", skill="echo", deps=["slow"]),
        PlanStep(id="last", skill="echo", deps=["next"]),
    ])
    cli = await connect_as("cli")
    await send(cli, "cli", "alice", plan)
    js = admin.jetstream()
    await wait_for_record(js, lambda r: r.key == "long-slow" and r.kind == "task_started")
    await send(cli, "cli", "alice", TaskCancelled(id=new_id(), task_id="long", reason="wrong branch"))
    await wait_for_record(js, lambda r: r.key == "long-last" and r.kind == "task_cancelled")
    await asyncio.sleep(1.0)  # give a wrongly dispatched step time to show up
    records = await audit_records(js)
    assert [r.kind for r in by_key(records, "long")][-1] == "task_cancelled"
    for step in ("long-slow", "long-next", "long-last"):
        assert by_key(records, step, "task_cancelled"), step
        assert not by_key(records, step, "task_completed"), step
    assert not by_key(records, "long-next", "task_dispatched")
    # The running skill was stopped, not left to finish: no result, not even a rejected one.
    assert not [r for r in records if r.key == "long-slow" and r.kind in ("task_completed", "task_failed")]
    # Cancelling again is refused, and says why.
    await send(cli, "cli", "alice", TaskCancelled(id=new_id(), task_id="long"))
    again = await wait_for_record(js, lambda r: r.key == "long" and not r.accepted)
    assert (again.code, again.reason) == ("task_terminal", "task long is already cancelled")


async def test_a_plain_task_with_retries_is_dead_lettered_after_its_last_attempt(
    agents: FailSkill, connect_as: Connect, admin: Client
) -> None:
    await send(await connect_as("cli"), "cli", "alice", TaskSubmitted(
        id=new_id(), task_id="again", skill="sleep", retry=RetryPolicy(max_attempts=2, backoff_s=0.05)))
    end = await wait_for_record(admin.jetstream(), lambda r: r.key == "again" and r.kind == "task_dead_lettered")
    assert end.event.reason == "failed 2 of 2 attempts; last error: boom 2"  # type: ignore[union-attr]


async def test_only_the_router_may_send_its_own_decisions(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    from ledgerbus.bus.events import TaskDispatched

    cli, agent = await connect_as("cli"), await connect_as("agent")
    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="t1", skill="echo"))
    await send(agent, "agent", "echo-1", TaskDispatched(id=new_id(), task_id="t1", skill="echo", dispatch=2))
    await send(cli, "cli", "alice", TaskCancelled(id=new_id(), task_id="t1", skipped=True))
    rejected = await wait_for_record(admin.jetstream(), lambda r: r.kind == "task_cancelled")
    records = await audit_records(admin.jetstream())
    assert [(r.kind, r.verdict, r.code) for r in records] == [
        ("task_submitted", "accepted", "ok"),
        ("task_dispatched", "rejected", "kind_not_allowed"),
        ("task_cancelled", "rejected", "bad_cancel"),
    ]
    assert rejected.reason == "only the router skips plan steps"


class DelegatingSkill:
    """Delegates ``input["depth"]`` levels deep, or fans out ``input["fanout"]`` subtasks."""

    name = "notes"
    description = "test: delegation"

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        if role := input.get("handoff"):
            return await ctx.handoff(role, {"draft": "v1"})
        if fanout := input.get("fanout"):
            return [await ctx.tasks.submit("echo", {"i": i}) for i in range(fanout)]
        depth = input.get("depth", 0)
        if depth == 0:
            return {"leaf": ctx.task_id, "parent": ctx.parent_task_id}
        below = await ctx.delegate("notes", {"depth": depth - 1})
        return {"depth": depth, "below": below}


@pytest.fixture
async def delegation(
    agents: FailSkill, connect_as: Connect, settings: Settings
) -> AsyncIterator[None]:
    """A projector (delegation waits read it) and a delegating agent, policy depth 2, fan-out 2."""
    from ledgerbus.projections.projector import Projector

    settings.policy_path.write_text("[delegation]\nmax_depth = 2\nmax_fanout = 2\n")
    profiles = settings.policy_path.parent / "profiles.toml"
    profiles.write_text('[profiles.reviewer]\ninstructions = "Review the draft."\nskills = ["echo"]\n')
    settings = settings.replace(profiles_path=profiles)
    stop = asyncio.Event()
    projector = Projector(await connect_as("projector"), settings)
    tasks = [asyncio.create_task(projector.run(stop))]
    await asyncio.wait_for(projector.serving.wait(), 10)
    tasks.append(asyncio.create_task(Agent(await connect_as("agent-scribe-1"), settings, "scribe-1",
                                           {"notes": DelegatingSkill()}, concurrency=8).run(stop)))
    yield
    stop.set()
    await asyncio.gather(*tasks)


async def test_delegation_returns_the_subtask_output_within_the_policy_bounds(
    delegation: None, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="ok2", skill="notes", input={"depth": 2}))
    done = await wait_for_record(admin.jetstream(), lambda r: r.key == "ok2" and r.kind in ("task_completed", "task_failed"))
    assert done.kind == "task_completed", done
    output = done.event.output  # type: ignore[union-attr]
    assert output["depth"] == 2 and output["below"]["depth"] == 1
    leaf = output["below"]["below"]
    records = await audit_records(admin.jetstream())
    middle = next(r.event for r in records if r.kind == "task_submitted" and r.event.parent_task_id == "ok2")  # type: ignore[union-attr]
    assert leaf["parent"] == middle.task_id  # type: ignore[union-attr]

    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="deep3", skill="notes", input={"depth": 3}))
    deep = await wait_for_record(admin.jetstream(), lambda r: r.key == "deep3" and r.kind in ("task_completed", "task_failed"))
    assert deep.kind == "task_failed"
    records = await audit_records(admin.jetstream())
    too_deep = [r for r in records if r.code == "delegation_too_deep"]
    assert len(too_deep) == 1 and too_deep[0].reason.endswith("would be 3 levels deep; policy allows 2")
    assert "delegation_too_deep" in deep.event.error  # type: ignore[union-attr]

    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="wide", skill="notes", input={"fanout": 3}))
    wide = await wait_for_record(admin.jetstream(), lambda r: r.key == "wide" and r.kind in ("task_completed", "task_failed"))
    assert wide.kind == "task_failed"
    records = await audit_records(admin.jetstream())
    assert [r.reason for r in records if r.code == "fanout_exceeded"] == [
        "task wide already has 2 subtasks; policy allows 2"]


async def test_cancelling_a_task_cancels_the_subtasks_its_skill_delegated(
    delegation: None, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="top", skill="notes", input={"depth": 2}))
    js = admin.jetstream()
    child = await wait_for_record(js, lambda r: r.kind == "task_submitted" and r.accepted
                                  and r.event.parent_task_id == "top")  # type: ignore[union-attr]
    await send(cli, "cli", "alice", TaskCancelled(id=new_id(), task_id="top"))
    rec = await wait_for_record(js, lambda r: r.key == child.key and r.kind == "task_cancelled")
    assert rec.principal == "router" and rec.event.reason == "parent top cancelled"  # type: ignore[union-attr]


async def test_a_handoff_is_a_marked_subtask_for_the_roles_skill(
    delegation: None, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="draft", skill="notes",
                                                  input={"handoff": "reviewer"}))
    js = admin.jetstream()
    done = await wait_for_record(js, lambda r: r.key == "draft" and r.kind in ("task_completed", "task_failed"))
    assert done.kind == "task_completed", done
    target = done.event.output["handed_off_to"]  # type: ignore[union-attr]
    assert done.event.output["role"] == "reviewer"  # type: ignore[union-attr]
    review = await wait_for_record(js, lambda r: r.key == target and r.kind == "task_completed")
    submitted = next(r.event for r in await audit_records(js) if r.key == target and r.kind == "task_submitted")
    assert (submitted.skill, submitted.parent_task_id, submitted.handoff) == ("echo", "draft", True)  # type: ignore[union-attr]
    assert review.event.output["input"] == {  # type: ignore[union-attr]
        "context": {"draft": "v1"}, "role": "reviewer", "instructions": "Review the draft.", "guardrails": [],
        "from": "scribe-1"}
    # The router records the handoff as an event of its own, linking the two tasks.
    handoff = await wait_for_record(js, lambda r: r.key == target and r.kind == "handoff")
    assert handoff.principal == "router"
    assert (handoff.event.from_task, handoff.event.from_role, handoff.event.to_role) == (  # type: ignore[union-attr]
        "draft", "scribe-1", "reviewer")
