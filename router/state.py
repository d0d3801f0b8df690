"""The router's state, folded from the audit log and nothing else.

At start the router reads AUDIT from the first record and applies each one here; while
running it applies each record right after sealing it. Two things live here:

- the lifecycle of every task (status, current claimant and attempt), which the
  lifecycle check consults so that only the claimant's result counts, exactly once;
- which INGRESS messages already have an audit record, so a message redelivered after
  a crash between "audit appended" and "ingress acked" is acted on again but never
  audited twice (invariant 2);
- the message ids of accepted records within the de-duplication horizon;
- where the last signed checkpoint is;
- which memory checkpoints each agent has (a restore must name one).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bus.events import (
    NO_RETRY,
    PLAN_SKILL,
    TASK_EVENTS,
    AgentJoined,
    AuditRecord,
    Budget,
    Checkpoint,
    CheckpointSaved,
    PlanStep,
    PlanSubmitted,
    ProposalApproved,
    RetryPolicy,
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
    step_task_id,
)

BUDGET_EXCEEDED = "budget_exceeded"
"""The code of an accepted usage report that took its task over budget: the task fails."""

APPROVAL_REQUESTED = "approval_requested"
"""The code of an accepted submission that waits for approval before it is dispatched."""

NO_AGENT = "no_agent"
"""The code of a submission whose skill nobody serves (not installed beside the router, no
live agent offers it): accepted and put on WORK, where it waits for an agent with the skill
(policy ``[tasks] unserved = "warn"``), or rejected (``"reject"``)."""

AWAITING_MATCH = "awaiting_match"
"""The code of an accepted submission whose skill nobody serves, held for the scheduler
(policy ``[tasks] unserved = "propose"``): it is dispatched to the live skill that provides
it best, and until one does it waits as ``skill_unmatched`` with a proposed agent."""

TERMINAL = frozenset({"completed", "failed", "denied", "cancelled", "skipped", "dead_lettered"})
"""States in which no claim or result is accepted any more. ``failed`` may still be
followed by a retry (a new dispatch), which the router decides, never an agent."""

@dataclass(slots=True)
class TaskState:
    """What the router knows of one task."""

    skill: str
    submitter: str = ""
    status: str = "pending"
    claimant: str = ""
    attempt: int = 0
    dispatch: int = 1
    held: TaskSubmitted | PlanSubmitted | None = None
    """The submission, kept while it waits for (and until it is dispatched by) approval."""
    budget: Budget | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    retry: RetryPolicy = NO_RETRY
    failures: int = 0
    retry_at: datetime | None = None
    error: str = ""
    output: Any = None
    """Kept for plan steps only: the context of the steps that depend on it."""
    submission: TaskSubmitted | None = None
    """Kept while a retry may need to dispatch the task again."""
    plan: PlanSubmitted | None = None
    """For a plan's parent task: the plan."""
    step: PlanStep | None = None
    """For a plan step: its definition."""
    deps: tuple[str, ...] = ()
    """For a plan step: the task ids of the steps it depends on."""
    dispatch_seq: int = 0
    """The audit seq of the record that made the current dispatch."""
    routed: bool = False
    """Its current dispatch is the router's own (``task_dispatched``), not the submission's."""
    trace: str = ""
    """The ``traceparent`` of the latest record about the task (for a plan, about any of
    its steps): the router's next decision about it is a span under its cause."""
    dispatch_trace: str = ""
    """The ``traceparent`` of the record of its current routed dispatch."""

    @property
    def terminal(self) -> bool:
        """Whether no further claim or result may be accepted for the task."""
        return self.status in TERMINAL

    @property
    def retries_left(self) -> bool:
        """Whether a failure of this task is followed by another run."""
        return self.failures < self.retry.max_attempts

    @property
    def settled(self) -> bool:
        """Whether nothing more will happen to the task: terminal, and no retry or dead
        letter decision outstanding."""
        if self.status == "failed":
            return self.retry.max_attempts == 1
        return self.terminal


class RouterState:
    """Task lifecycles and recently audited ingress messages."""

    def __init__(self, audited_capacity: int = 65_536, dedup_horizon_s: float = 24 * 3600) -> None:
        self.tasks: dict[str, TaskState] = {}
        self.last_checkpoint_seq = 0
        self.last_checkpoint: Checkpoint | None = None
        """The newest signed checkpoint in the log (the one the chain's anchor names)."""
        self.checkpoints: dict[str, dict[str, int]] = {}
        """agent name → its memory checkpoints' ids → the seq that saved each"""
        self.registry: dict[str, set[str]] = {}
        """every skill an agent has advertised → the capabilities advertised with it"""
        self.proposals: dict[str, SkillUnmatched] = {}
        """proposal id (the ``skill_unmatched`` event id) → the event"""
        self.approved_proposals: set[str] = set()
        self.joined_at: dict[str, datetime] = {}
        """skill → when an agent advertising it last joined (its heartbeat may not have
        reached the router's watch yet: see :mod:`router.checks.unserved`)"""
        self.unmatched: set[str] = set()
        """Plan steps, and submissions held for a match, waiting for a live agent with the
        capabilities they need."""
        self.dirty: set[str] = set()
        """Tasks the scheduler should look at again (see :mod:`router.scheduler`)."""
        self._timers: list[tuple[datetime, str]] = []
        self._audited: OrderedDict[int, AuditRecord] = OrderedDict()
        self._capacity = audited_capacity
        # message id -> (seq, time) of accepted records, oldest first, for dedup_horizon_s.
        self._messages: OrderedDict[str, tuple[int, datetime]] = OrderedDict()
        self._horizon = timedelta(seconds=dedup_horizon_s)

    def apply(self, record: AuditRecord, traceparent: str = "") -> None:
        """Fold one audit record into the state; ``traceparent`` is the trace context
        its AUDIT message carries (the span that decided it), if any."""
        if record.checkpoint is not None:
            self.last_checkpoint_seq, self.last_checkpoint = record.seq, record.checkpoint
            return
        if record.ingress_seq:
            self._audited[record.ingress_seq] = record
            self._audited.move_to_end(record.ingress_seq)
            while len(self._audited) > self._capacity:
                self._audited.popitem(last=False)
        if not record.accepted:
            return
        if record.msg_id:
            self._messages[record.msg_id] = (record.seq, record.at)
            while self._messages and next(iter(self._messages.values()))[1] < record.at - self._horizon:
                self._messages.popitem(last=False)
        self._fold(record, traceparent)

    def _touch(self, task_id: str) -> None:
        self.dirty.add(task_id)
        task = self.tasks.get(task_id)
        if task is not None and task.parent is not None:
            self.dirty.add(task.parent)

    def _fold(self, record: AuditRecord, traceparent: str) -> None:
        event = record.event
        match event:
            case TaskSubmitted(task_id=task_id, skill=skill) as submission:
                held = record.code == APPROVAL_REQUESTED
                # Held for a match: the scheduler dispatches it (from the kept submission)
                # once a live skill provides it, as it does a plan step named by capabilities.
                waits = record.code == AWAITING_MATCH
                retry = submission.retry or NO_RETRY
                self.tasks[task_id] = TaskState(
                    skill=skill,
                    submitter=record.principal,
                    status="awaiting_approval" if held else "waiting" if waits else "pending",
                    dispatch=0 if waits else 1,
                    held=submission if held else None,
                    budget=submission.budget,
                    parent=submission.parent_task_id,
                    retry=retry,
                    submission=submission if retry.max_attempts > 1 or waits else None,
                    trace=traceparent,
                )
                if (parent := self.tasks.get(submission.parent_task_id or "")) is not None:
                    parent.children.append(task_id)
            case PlanSubmitted(task_id=plan_id) as plan:
                held = record.code == APPROVAL_REQUESTED
                children = [step_task_id(plan_id, s.id) for s in plan.steps]
                self.tasks[plan_id] = TaskState(
                    skill=PLAN_SKILL, submitter=record.principal, status="awaiting_approval" if held else "running",
                    held=plan if held else None, children=children, plan=plan, parent=plan.parent_task_id,
                    trace=traceparent,
                )
                if (parent := self.tasks.get(plan.parent_task_id or "")) is not None:
                    parent.children.append(plan_id)
                for step, child in zip(plan.steps, children, strict=True):
                    self.tasks[child] = TaskState(
                        skill=step.skill or "", submitter=record.principal, status="waiting", parent=plan_id,
                        dispatch=0, retry=step.retry, step=step, deps=tuple(step_task_id(plan_id, d) for d in step.deps),
                        trace=traceparent,
                    )
            case TaskUsage(task_id=task_id) as usage:
                task = self.tasks[task_id]
                task.tokens += usage.tokens_in + usage.tokens_out
                task.cost_usd += usage.cost_usd
                if record.code == BUDGET_EXCEEDED:
                    task.status, task.retry, task.error = "failed", NO_RETRY, record.reason
            case TaskApproved(task_id=task_id):
                task = self.tasks[task_id]
                task.status = "running" if task.plan is not None else "pending"
                if task.plan is not None:
                    task.held = None
            case TaskDenied(task_id=task_id):
                self.tasks[task_id].status, self.tasks[task_id].held = "denied", None
            case TaskStarted(task_id=task_id, attempt=attempt):
                task = self.tasks[task_id]
                task.status, task.claimant, task.attempt = "running", record.principal, attempt
                task.held = None
            case TaskCompleted(task_id=task_id) as done:
                task = self.tasks[task_id]
                task.status, task.submission = "completed", None
                if task.step is not None:
                    task.output = done.output
            case TaskFailed(task_id=task_id) as failed:
                task = self.tasks[task_id]
                task.status, task.error = "failed", failed.error
                task.failures += 1
            case TaskDispatched(task_id=task_id) as dispatched:
                task = self.tasks[task_id]
                task.status, task.skill, task.dispatch, task.retry_at = (
                    "pending", dispatched.skill, dispatched.dispatch, None
                )
                task.routed, task.dispatch_seq, task.dispatch_trace = True, record.seq, traceparent
                self.unmatched.discard(task_id)
            case TaskRetryScheduled(task_id=task_id, not_before=at):
                task = self.tasks[task_id]
                task.status, task.retry_at = "retrying", at
                heapq.heappush(self._timers, (at, task_id))
            case TaskDeadLettered(task_id=task_id, reason=reason):
                task = self.tasks[task_id]
                task.status, task.error, task.submission = "dead_lettered", reason, None
            case TaskCancelled(task_id=task_id, reason=reason) as cancel:
                task = self.tasks[task_id]
                task.status = "skipped" if cancel.skipped else "cancelled"
                task.error, task.submission, task.held, task.retry_at = reason, None, None, None
                self.unmatched.discard(task_id)
            case ProposalApproved(proposal_id=proposal_id):
                self.approved_proposals.add(proposal_id)
            case SkillUnmatched(task_id=task_id) as unmatched:
                self.tasks[task_id].status = "unmatched"
                self.unmatched.add(task_id)
                self.proposals[unmatched.id] = unmatched
            case AgentJoined(skills=skills, capabilities=caps):
                for skill in skills:
                    self.registry.setdefault(skill, set()).update(caps.get(skill, ()))
                    self.joined_at[skill] = record.at
            case CheckpointSaved(agent=agent, checkpoint_id=cid):
                self.checkpoints.setdefault(agent, {})[cid] = record.seq
            case _:
                return
        if isinstance(event, TASK_EVENTS):
            self._touch(event.task_id)
            if traceparent:
                self._traced(event.task_id, traceparent)

    def _traced(self, task_id: str, traceparent: str) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        task.trace = traceparent
        if task.step is not None and (plan := self.tasks.get(task.parent or "")) is not None:
            plan.trace = traceparent

    def cause(self, task_id: str) -> str:
        """The ``traceparent`` a decision about ``task_id`` is traced under: the latest
        record about it, or, for a plan step, about its plan (a finished dependency is
        what dispatches the next step)."""
        task = self.tasks.get(task_id)
        if task is None:
            return ""
        if task.step is not None and (plan := self.tasks.get(task.parent or "")) is not None:
            return plan.trace
        return task.trace

    def due(self, now: datetime) -> datetime | None:
        """Mark the tasks whose retry time has come dirty; return the next retry time."""
        while self._timers and self._timers[0][0] <= now:
            _, task_id = heapq.heappop(self._timers)
            self.dirty.add(task_id)
        return self._timers[0][0] if self._timers else None

    def take_dirty(self) -> list[str]:
        """The tasks to look at again, in a stable order; the set is emptied."""
        dirty, self.dirty = sorted(self.dirty), set()
        return dirty

    def open_tasks(self) -> list[str]:
        """Every task something may still happen to (a router at start looks at them all)."""
        return [task_id for task_id, task in self.tasks.items() if not task.settled]

    def seen_message(self, msg_id: str) -> int | None:
        """The seq of the accepted record with this message id, within the horizon."""
        seen = self._messages.get(msg_id)
        return seen[0] if seen is not None else None

    def audited(self, ingress_seq: int) -> AuditRecord | None:
        """The audit record already written for an INGRESS message, if any."""
        return self._audited.get(ingress_seq)

    def forget_acked_before(self, ingress_first_seq: int) -> None:
        """Drop records of INGRESS messages that are gone (acked) from the stream."""
        for seq in [s for s in self._audited if s < ingress_first_seq]:
            del self._audited[seq]
