"""A task's lifecycle, defined once: its statuses, which are terminal, and the status a
task has after each record of its history.

The router's state, the tasks projection and every ``agentctl`` view (``submit --wait``,
``submit --plan --wait``, ``top``) fold the same log; they all take a task's status from
:func:`after`, so a change to the task protocol is made here once and cannot make them
disagree. :data:`TRANSITIONS` lists every move :func:`after` can make, for the diagram in
docs/architecture.md (:func:`mermaid`) and for the test that checks one against the other.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

from ledgerbus.bus.events import (
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
    kind_of,
)
from ledgerbus.bus.records import AuditRecord


class Status(StrEnum):
    """Where a task is. The same words in the router, the projection and the views."""

    SUBMITTED = "submitted"
    """Sent, no verdict seen yet: only a view that follows a submission shows it."""
    WAITING = "waiting"
    """Not dispatchable yet: a plan step whose dependencies have not all completed, or a
    submission held until a live skill provides it (``awaiting_match``)."""
    AWAITING_APPROVAL = "awaiting_approval"
    """Held until an approver decides (a dangerous skill)."""
    UNMATCHED = "unmatched"
    """No live agent offers what it needs; a proposal was made (``skill_unmatched``)."""
    PENDING = "pending"
    """Dispatched: its work item is in WORK, nobody holds a claim yet."""
    RUNNING = "running"
    """A task: claimed by an agent. A plan: under way."""
    RETRYING = "retrying"
    """Failed with attempts left: dispatched again at its retry time."""
    COMPLETED = "completed"
    FAILED = "failed"
    DENIED = "denied"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    """A plan step that will not run because a dependency did not complete."""
    DEAD_LETTERED = "dead_lettered"
    """Every delivery of its work lapsed (MaxDeliver), or its retries ran out."""
    REJECTED = "rejected"
    """Its submission was rejected: the task never existed for the router. Only views that
    follow a submission's verdict (``submit --wait``) ever show it."""


class Shape(StrEnum):
    """What kind of task: a plain task, a plan, or one step of a plan."""

    TASK = "task"
    PLAN = "plan"
    STEP = "step"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.DENIED, Status.CANCELLED, Status.SKIPPED,
                      Status.DEAD_LETTERED, Status.REJECTED})
"""No claim or result is accepted any more. ``failed`` may still be followed by a retry (a
new dispatch), which the router decides, never an agent: see :func:`settled`."""

APPROVAL_REQUESTED = "approval_requested"
"""The code of an accepted submission that waits for approval before it is dispatched."""
BUDGET_EXCEEDED = "budget_exceeded"
"""The code of an accepted usage report that took its task over budget: the task fails."""
CLAIMED = "claimed"
"""The flag of a result that carries its claim (``task_completed claimed``): a task that
finished before its agent sent ``task_started`` is claimed and settled by one record."""
NO_AGENT = "no_agent"
"""The code of a submission whose skill nobody serves: accepted and queued in WORK all the
same (policy ``[tasks] unserved = "warn"``), or rejected (``"reject"``)."""
AWAITING_MATCH = "awaiting_match"
"""The code of an accepted submission whose skill nobody serves, held until a live skill
provides it (policy ``[tasks] unserved = "propose"``)."""


def settled(status: Status, retryable: bool) -> bool:
    """Whether nothing more will happen to a task: terminal, and (for a failure) no retry
    or dead letter decision outstanding. ``retryable``: the task may run more than once
    (``max_attempts > 1``), so each of its failures is followed by one of those decisions."""
    if status is Status.FAILED:
        return not retryable
    return status in TERMINAL


def created(record: AuditRecord, shape: Shape, step: str = "") -> Status:
    """The status of a task when the record that creates it is accepted: a submission
    (``task_submitted``), a plan (``plan_submitted``), or each step of that plan (``step``
    its id); a rejected submission makes a task that exists only in the submitter's view.
    A fork's kept subtask or plan step (``kept``: done in the run it comes from) is created
    completed."""
    if not record.accepted:
        return Status.REJECTED
    event = record.event
    if shape is Shape.STEP:
        return Status.COMPLETED if isinstance(event, PlanSubmitted) and step in event.kept else Status.WAITING
    if isinstance(event, TaskSubmitted) and event.kept is not None:
        return Status.COMPLETED
    if record.code == APPROVAL_REQUESTED:
        return Status.AWAITING_APPROVAL
    if shape is Shape.PLAN:
        return Status.RUNNING
    return Status.WAITING if record.code == AWAITING_MATCH else Status.PENDING


def _approved(status: Status, record: AuditRecord, shape: Shape) -> Status:
    return Status.RUNNING if shape is Shape.PLAN else Status.PENDING


def _usage(status: Status, record: AuditRecord, shape: Shape) -> Status:
    return Status.FAILED if record.code == BUDGET_EXCEEDED else status


def _cancelled(status: Status, record: AuditRecord, shape: Shape) -> Status:
    skipped = isinstance(record.event, TaskCancelled) and record.event.skipped
    return Status.SKIPPED if skipped else Status.CANCELLED


def _to(target: Status) -> Callable[[Status, AuditRecord, Shape], Status]:
    return lambda status, record, shape: target


_AFTER: dict[type, Callable[[Status, AuditRecord, Shape], Status]] = {
    TaskApproved: _approved,
    TaskDenied: _to(Status.DENIED),
    TaskStarted: _to(Status.RUNNING),
    TaskCompleted: _to(Status.COMPLETED),
    TaskFailed: _to(Status.FAILED),
    TaskUsage: _usage,
    TaskDispatched: _to(Status.PENDING),
    TaskRetryScheduled: _to(Status.RETRYING),
    TaskDeadLettered: _to(Status.DEAD_LETTERED),
    TaskCancelled: _cancelled,
    SkillUnmatched: _to(Status.UNMATCHED),
}
"""Event type → the status it leaves a task in; types not here (progress, a submission
seen again) leave the status as it was."""


def after(status: Status, record: AuditRecord, shape: Shape) -> Status:
    """The status of a task after one more record of its history (``record.key`` is the
    task). A rejected record changes nothing: only accepted records are facts."""
    if not record.accepted:
        return status
    move = _AFTER.get(type(record.event))
    return move(status, record, shape) if move is not None else status


class Transition(NamedTuple):
    """One move of the lifecycle: from a status, on a record, to a status."""

    source: Status
    on: str
    """The record's kind, with its code or flag where that decides (``task_usage budget_exceeded``)."""
    target: Status
    shapes: frozenset[Shape] = frozenset(Shape)


_TASKS = frozenset({Shape.TASK, Shape.STEP})
_T = Transition
TRANSITIONS: tuple[Transition, ...] = (
    _T(Status.AWAITING_APPROVAL, "task_approved", Status.PENDING, _TASKS),
    _T(Status.AWAITING_APPROVAL, "task_approved", Status.RUNNING, frozenset({Shape.PLAN})),
    _T(Status.AWAITING_APPROVAL, "task_denied", Status.DENIED),
    _T(Status.AWAITING_APPROVAL, "task_cancelled", Status.CANCELLED),
    _T(Status.WAITING, "task_dispatched", Status.PENDING, _TASKS),
    _T(Status.WAITING, "skill_unmatched", Status.UNMATCHED, _TASKS),
    _T(Status.WAITING, "task_cancelled skipped", Status.SKIPPED, frozenset({Shape.STEP})),
    _T(Status.WAITING, "task_cancelled", Status.CANCELLED, _TASKS),
    _T(Status.UNMATCHED, "task_dispatched", Status.PENDING, _TASKS),
    _T(Status.UNMATCHED, "task_cancelled", Status.CANCELLED, _TASKS),
    _T(Status.UNMATCHED, "task_cancelled skipped", Status.SKIPPED, frozenset({Shape.STEP})),
    _T(Status.PENDING, "task_started", Status.RUNNING, _TASKS),
    _T(Status.PENDING, f"task_completed {CLAIMED}", Status.COMPLETED, _TASKS),
    _T(Status.PENDING, f"task_failed {CLAIMED}", Status.FAILED, _TASKS),
    _T(Status.PENDING, "task_dispatched", Status.PENDING, _TASKS),
    _T(Status.PENDING, "task_cancelled", Status.CANCELLED, _TASKS),
    _T(Status.PENDING, "task_dead_lettered", Status.DEAD_LETTERED, _TASKS),
    _T(Status.PENDING, "skill_unmatched", Status.UNMATCHED, _TASKS),
    _T(Status.RUNNING, "task_started", Status.RUNNING, _TASKS),
    _T(Status.RUNNING, "task_completed", Status.COMPLETED),
    _T(Status.RUNNING, "task_failed", Status.FAILED),
    _T(Status.RUNNING, f"task_completed {CLAIMED}", Status.COMPLETED, _TASKS),
    _T(Status.RUNNING, f"task_failed {CLAIMED}", Status.FAILED, _TASKS),
    _T(Status.RUNNING, f"task_usage {BUDGET_EXCEEDED}", Status.FAILED, _TASKS),
    _T(Status.RUNNING, "task_cancelled", Status.CANCELLED),
    _T(Status.RUNNING, "task_dead_lettered", Status.DEAD_LETTERED, _TASKS),
    _T(Status.RUNNING, "task_dispatched", Status.PENDING, _TASKS),
    _T(Status.RUNNING, "skill_unmatched", Status.UNMATCHED, _TASKS),
    _T(Status.FAILED, "task_retry_scheduled", Status.RETRYING, _TASKS),
    _T(Status.FAILED, "task_dead_lettered", Status.DEAD_LETTERED, _TASKS),
    _T(Status.FAILED, "task_cancelled", Status.CANCELLED, _TASKS),
    _T(Status.RETRYING, "task_dispatched", Status.PENDING, _TASKS),
    _T(Status.RETRYING, "task_cancelled", Status.CANCELLED, _TASKS),
    _T(Status.RETRYING, "skill_unmatched", Status.UNMATCHED, _TASKS),
)
"""Every move the router makes. The statuses a task is created in come from
:func:`created`; a rejected record moves nothing."""


def claim_of(event: object) -> TaskStarted | None:
    """The claim a message makes: a ``TaskStarted``, or the one a result carries
    (``TaskCompleted.claim``), as the ``TaskStarted`` it stands for."""
    if isinstance(event, TaskStarted):
        return event
    if isinstance(event, TaskCompleted | TaskFailed) and event.claim is not None:
        return TaskStarted(id=event.id, task_id=event.task_id, attempt=event.attempt,
                           dispatch=event.claim.dispatch, token=event.claim.token)
    return None


def on_label(record: AuditRecord) -> str:
    """The ``on`` of the :class:`Transition` a record makes: its kind, with the code or
    flag that decides where it leads."""
    event = record.event
    kind = kind_of(type(event)) if event is not None else record.kind
    if isinstance(event, TaskUsage) and record.code == BUDGET_EXCEEDED:
        return f"{kind} {BUDGET_EXCEEDED}"
    if isinstance(event, TaskCancelled) and event.skipped:
        return f"{kind} skipped"
    if isinstance(event, TaskCompleted | TaskFailed) and event.claim is not None:
        return f"{kind} {CLAIMED}"
    return kind


def mermaid() -> str:
    """The lifecycle as a Mermaid state diagram, from :data:`TRANSITIONS` and :func:`created`."""
    lines = ["stateDiagram-v2",
             f"    [*] --> {Status.PENDING}: task_submitted",
             f"    [*] --> {Status.AWAITING_APPROVAL}: submitted, {APPROVAL_REQUESTED}",
             f"    [*] --> {Status.WAITING}: plan step, or {AWAITING_MATCH}",
             f"    [*] --> {Status.RUNNING}: plan_submitted (the plan)",
             f"    [*] --> {Status.COMPLETED}: a fork's kept subtask or plan step"]
    seen: set[tuple[Status, str, Status]] = set()
    for t in TRANSITIONS:
        if (t.source, t.on, t.target) not in seen:
            seen.add((t.source, t.on, t.target))
            lines.append(f"    {t.source} --> {t.target}: {t.on}")
    lines += [f"    {s} --> [*]" for s in (Status.COMPLETED, Status.DENIED, Status.CANCELLED, Status.SKIPPED,
                                           Status.DEAD_LETTERED)]
    return "\n".join(lines) + "\n"
