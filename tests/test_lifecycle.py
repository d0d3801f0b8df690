"""One lifecycle: the router, the tasks projection and the CLI's views give every task the
same status, after every record of any valid log, and every move they make is one the
lifecycle (bus/lifecycle.py) lists and the architecture page draws."""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledgerbus.bus import lifecycle
from ledgerbus.bus.events import (
    TASK_EVENTS,
    AgentProposal,
    Claim,
    PlanSubmitted,
    SkillUnmatched,
    TaskApproved,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDenied,
    TaskDispatched,
    TaskFailed,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
)
from ledgerbus.bus.follow import TaskView
from ledgerbus.bus.lifecycle import TERMINAL, TRANSITIONS, Shape, Status
from ledgerbus.bus.plan_view import PlanView
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections import db as dbmod
from ledgerbus.projections import tasks as tasks_projection
from ledgerbus.projections.apply import apply_batch
from ledgerbus.router import state as router_state
from ledgerbus.router.state import RouterState
from tests.test_projection_properties import CAP, DrawPicker, RandomPicker, build

REPO = Path(__file__).resolve().parent.parent
AT = datetime(2026, 1, 1, tzinfo=UTC)


def record(event: object, code: str = "ok", verdict: str = "accepted") -> AuditRecord:
    return AuditRecord(seq=1, at=AT, verdict=verdict, code=code, reason="", principal="router", kind="k",  # type: ignore[arg-type]
                       key="t", msg_id="m", ingress_seq=0, delivery=0, event=event)  # type: ignore[arg-type]


def example(on: str) -> AuditRecord:
    """A record that makes the move named ``on`` (its kind, with a code or a flag)."""
    kind, _, detail = on.partition(" ")
    claim = Claim(dispatch=1, token="sha256:x") if detail == lifecycle.CLAIMED else None
    events = {
        "task_approved": TaskApproved(id="m", task_id="t"),
        "task_denied": TaskDenied(id="m", task_id="t"),
        "task_started": TaskStarted(id="m", task_id="t", attempt=1),
        "task_completed": TaskCompleted(id="m", task_id="t", attempt=1, claim=claim),
        "task_failed": TaskFailed(id="m", task_id="t", attempt=1, error="e", claim=claim),
        "task_usage": TaskUsage(id="m", task_id="t", attempt=1),
        "task_dispatched": TaskDispatched(id="m", task_id="t", skill="echo", dispatch=2),
        "task_retry_scheduled": TaskRetryScheduled(id="m", task_id="t", failures=1, not_before=AT),
        "task_dead_lettered": TaskDeadLettered(id="m", task_id="t", failures=1, reason="r"),
        "task_cancelled": TaskCancelled(id="m", task_id="t", skipped=detail == "skipped"),
        "skill_unmatched": SkillUnmatched(id="m", task_id="t", capabilities=["x"],
                                          proposal=AgentProposal(name="x-agent", skills=["x"])),
    }
    return record(events[kind], code=detail if kind == "task_usage" else "ok")


def test_every_listed_transition_is_the_one_the_function_makes() -> None:
    for t in TRANSITIONS:
        for shape in t.shapes:
            assert lifecycle.after(t.source, example(t.on), shape) is t.target, t


def test_a_rejected_record_moves_nothing_and_creates_only_a_rejection() -> None:
    for t in TRANSITIONS:
        rejected = example(t.on)
        rejected = AuditRecord(**{**{f: getattr(rejected, f) for f in rejected.__struct_fields__},
                                  "verdict": "rejected", "code": "x"})
        assert lifecycle.after(t.source, rejected, Shape.TASK) is t.source
    assert lifecycle.created(record(TaskSubmitted(id="m", task_id="t", skill="echo"), "x", "rejected"),
                             Shape.TASK) is Status.REJECTED


def test_every_task_event_has_a_handler_in_the_router_and_the_projection() -> None:
    assert set(TASK_EVENTS) <= set(router_state._FOLDS) | router_state._UNCHANGED
    assert set(TASK_EVENTS) == set(tasks_projection._FOLDS)


def test_the_diagram_in_the_architecture_page_is_the_one_the_code_makes() -> None:
    page = (REPO / "docs" / "architecture.md").read_text()
    drawn = re.search(r"```mermaid\n(stateDiagram-v2\n.*?)```", page, re.DOTALL)
    assert drawn is not None, "docs/architecture.md has no lifecycle diagram"
    assert drawn.group(1) == lifecycle.mermaid(), "regenerate it: python -c 'from bus import lifecycle; print(lifecycle.mermaid())'"


def test_every_status_is_drawn_in_the_terminal() -> None:
    from ledgerbus.agentctl.reads import STATUS_STYLE

    assert {str(s) for s in Status} <= set(STATUS_STYLE)


# -- the property --------------------------------------------------------------------------


def views(log: Sequence[AuditRecord]) -> dict[str, Status]:
    """Every task's status as ``submit --wait`` (a task) and ``submit --plan --wait`` (a plan
    and its steps) would show it, each following the log from its own submission."""
    found: dict[str, Status] = {}
    task_views: dict[str, TaskView] = {}
    plan_views: dict[str, PlanView] = {}
    for r in log:
        match r.event:
            case TaskSubmitted(task_id=task_id) if r.accepted and task_id not in task_views:
                task_views[task_id] = TaskView(task_id, r.msg_id)
            case PlanSubmitted(task_id=plan_id) as plan if r.accepted and plan_id not in plan_views:
                plan_views[plan_id] = PlanView(plan)
        if (view := task_views.get(r.key)) is not None:
            view.apply(r)
        for plan_view in plan_views.values():
            if r.key in plan_view.keys:
                plan_view.apply(r)
    found.update({t: v.status for t, v in task_views.items()})
    for plan_id, plan_view in plan_views.items():
        found[plan_id] = plan_view.status
        found.update({tid: s.status for tid, s in plan_view.steps.items()})
    return found


async def projected(log: Sequence[AuditRecord]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        db = await dbmod.open_db(Path(tmp) / "p.db", CAP)
        try:
            await apply_batch(db, log, await dbmod.position(db))
            async with db.execute("SELECT task_id, status FROM tasks") as cur:
                return {row[0]: row[1] for row in await cur.fetchall()}
        finally:
            await db.close()


def agree(log: Sequence[AuditRecord], model: dict[str, str]) -> None:
    state = RouterState()
    moves: set[tuple[Status, str, Status, Shape]] = set()
    for r in log:
        before = state.tasks[r.key].status if r.key in state.tasks else None
        state.apply(r)
        task = state.tasks.get(r.key)
        if before is not None and task is not None and r.accepted and task.status is not before:
            moves.add((before, lifecycle.on_label(r), task.status, task.shape))
    listed = {(t.source, t.on, t.target, shape) for t in TRANSITIONS for shape in t.shapes}
    assert moves <= listed, f"moves the lifecycle does not list: {sorted(moves - listed)}"
    router = {t: str(task.status) for t, task in state.tasks.items()}
    assert router == model, "the router and the log's model disagree"
    assert asyncio.run(projected(log)) == router
    # A view follows its task from the submission on and knows no archive: an archive lets go
    # of settled trees only, whose views show the status they ended in.
    followed = {t: str(s) for t, s in views(log).items()}
    assert {t: s for t, s in followed.items() if t in router} == router
    assert all(Status(s) in TERMINAL for t, s in followed.items() if t not in router)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_router_projection_and_views_agree_on_every_status(data: st.DataObject) -> None:
    builder = build(DrawPicker(data.draw), data.draw(st.integers(1, 60)))
    agree(builder.records, {t: m.status for t, m in builder.tasks.items()})


def test_long_seeded_logs_agree_too() -> None:
    for seed in range(4):
        builder = build(RandomPicker(seed), 150)
        agree(builder.records, {t: m.status for t, m in builder.tasks.items()})


def test_a_failed_subtask_with_attempts_left_is_cancelled_with_its_parent() -> None:
    # Found by the property above (once in many runs): a subtask that failed with attempts
    # left, whose parent was cancelled before its retry was scheduled, is cancelled by the
    # router's cascade, a move the lifecycle did not list. Seed 48 makes that log.
    builder = build(RandomPicker(48), 150)
    state = RouterState()
    cancelled_after_failing = False
    for r in builder.records:
        before = state.tasks[r.key].status if r.key in state.tasks else None
        state.apply(r)
        cancelled_after_failing |= before is Status.FAILED and r.accepted and r.kind == "task_cancelled"
    assert cancelled_after_failing, "seed 48 no longer makes the case: find another"
    agree(builder.records, {t: m.status for t, m in builder.tasks.items()})
