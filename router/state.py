"""The router's state, folded from the audit log and nothing else.

At start the router reads AUDIT from the first record and applies each one here; while
running it applies each record right after sealing it. Two things live here:

- the lifecycle of every task (status, current claimant and attempt), which the
  lifecycle check consults so that only the claimant's result counts, exactly once;
- which INGRESS messages already have an audit record, and the message ids of accepted
  records within the de-duplication horizon (:mod:`router.seen`);
- where the last signed checkpoint is;
- which memory checkpoints each agent has (a restore must name one);
- the work assigned to each agent that has not finished (``inflight``), which bounds what
  the scheduler assigns to it (docs/orchestration.md, "Where work goes").

It is bounded: an ``audit_archived`` record lets go of every task tree settled by its
``through_seq`` (:mod:`bus.compaction`), with everything kept about those tasks, so the
state holds the open tasks and those settled since the last archive.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ledgerbus.bus import compaction, lifecycle
from ledgerbus.bus.anchor import RESTART_CODE
from ledgerbus.bus.events import (
    NO_RETRY,
    PLAN_SKILL,
    TASK_EVENTS,
    AgentJoined,
    Budget,
    CheckpointSaved,
    Handoff,
    PlanSubmitted,
    ProposalApproved,
    SkillUnmatched,
    TaskApproved,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDenied,
    TaskDispatched,
    TaskFailed,
    TaskProgress,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
    step_task_id,
)
from ledgerbus.bus.lifecycle import APPROVAL_REQUESTED, AWAITING_MATCH, BUDGET_EXCEEDED, Shape, Status
from ledgerbus.bus.records import AuditRecord, Checkpoint
from ledgerbus.router.seen import Seen
from ledgerbus.router.tasks import AnyTask, PlanState, StepState, TaskState, over


class RouterState:
    """Task lifecycles and recently audited ingress messages."""

    def __init__(self, audited_capacity: int = 65_536, dedup_horizon_s: float = 24 * 3600,
                 dedup_max_ids: int = 200_000) -> None:
        self.tasks: dict[str, AnyTask] = {}
        self.last_checkpoint_seq = 0
        self.last_checkpoint: Checkpoint | None = None
        """The newest signed checkpoint in the log (the one the chain's anchor names)."""
        self.checkpoint_hashes: dict[int, str] = {}
        """seq → hash of every checkpoint record: what a snapshot vouches for the records an
        anchor may name (``router/snapshots.py``), without reading the log up to them."""
        self.restarts: list[AuditRecord] = []
        """Every checkpoint record with which an operator accepted a new chain (what the
        anchor check looks for: ``bus/anchor.py``)."""
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
        self.inflight: dict[str, set[str]] = {}
        """agent → the tasks assigned to it that are dispatched or running"""
        self.held: dict[str, set[str]] = {}
        """agent → ready tasks the scheduler matched to it that wait for a free slot there
        (the scheduler's; looked at again when one of its assigned tasks ends)"""
        self.ready_since: dict[str, datetime] = {}
        """When the scheduler first found a task ready and could not dispatch it: its
        priority grows with the wait (the scheduler's; a new router starts the clocks anew)"""
        self.orphaned: set[str] = set()
        """Tasks assigned to an agent that no longer offers their skill (every instance
        left): the scheduler hands them on."""
        self._timers: list[tuple[datetime, str]] = []
        self._traceparent = ""
        """The trace context of the record being folded (see :meth:`apply`)."""
        self.seen = Seen(audited_capacity, dedup_horizon_s, dedup_max_ids)
        """Audited INGRESS messages, and accepted message ids within the horizon."""
        self.archived_through = 0
        """``through_seq`` of the last ``audit_archived`` record: the tasks settled by then
        were let go of (their records are in the archive)."""
        self.archived_tasks = 0
        """How many tasks archives have let go of, in all."""
        self._recent: OrderedDict[str, int] = OrderedDict()
        """The tasks whose last record is after the last archive's cut, by that record's seq,
        oldest first: the only trees the next archive may let go of (:mod:`bus.compaction`).
        Derived from the tasks, so a snapshot does not save it (``router/snapshots.py``)."""

    def apply(self, record: AuditRecord, traceparent: str = "") -> None:
        """Fold one audit record into the state; ``traceparent`` is the trace context
        its AUDIT message carries (the span that decided it), if any."""
        self._traceparent = traceparent
        if record.checkpoint is not None:
            self.last_checkpoint_seq, self.last_checkpoint = record.seq, record.checkpoint
            self.checkpoint_hashes[record.seq] = record.hash
            if record.code == RESTART_CODE:
                self.restarts.append(record)
            return
        if record.ingress_seq:
            self.seen.ingress(record)
        if not record.accepted:
            return
        if (through := compaction.archived_through(record)) is not None:
            self._archived(through)
            return
        if record.msg_id:
            self.seen.accepted(record)
        self._fold(record, traceparent)

    def _touch(self, task_id: str) -> None:
        self.dirty.add(task_id)
        task = self.tasks.get(task_id)
        if task is not None and task.parent is not None:
            self.dirty.add(task.parent)

    def _fold(self, record: AuditRecord, traceparent: str) -> None:
        event = record.event
        fold = _FOLDS.get(type(event))
        if fold is None:
            return
        fold(self, record, event)
        if isinstance(event, TASK_EVENTS):
            task = self.tasks.get(event.task_id)
            if task is not None:
                if task.last_seq != record.seq:
                    self._seen(event.task_id, task, record.seq)
                if task.retryable and compaction.stops_retries(record):
                    task.retryable = False
            if task is not None and type(event) not in _CREATES:
                # One definition of what each record does to a status: bus/lifecycle.py.
                task.status = lifecycle.after(task.status, record, task.shape)
                if task.agent and task.status not in _ASSIGNED:
                    self._release(event.task_id, task)
            self._touch(event.task_id)
            if traceparent:
                self._traced(event.task_id, traceparent)

    def _release(self, task_id: str, task: AnyTask) -> None:
        """The task no longer holds a slot of the agent it was assigned to: what waits for
        one there is looked at again."""
        agent, task.agent = task.agent, ""
        self.inflight.get(agent, set()).discard(task_id)
        self.orphaned.discard(task_id)
        self.wake_held(agent)

    def wake_held(self, agent: str | None = None) -> None:
        """Mark the tasks waiting for a slot (of ``agent``, or of any) dirty, with their plans."""
        for name in [agent] if agent is not None else list(self.held):
            for task_id in self.held.pop(name, ()):
                self._touch(task_id)

    def _submitted(self, record: AuditRecord, submission: TaskSubmitted) -> None:
        held = record.code == APPROVAL_REQUESTED
        # Held for a match: the scheduler dispatches it (from the kept submission) once a
        # live skill provides it, as it does a plan step named by capabilities.
        waits = record.code == AWAITING_MATCH
        retry = submission.retry or NO_RETRY
        made = self.tasks[submission.task_id] = TaskState(
            skill=submission.skill, submitter=record.principal, status=lifecycle.created(record, Shape.TASK),
            dispatch=0 if waits else 1, held=submission if held else None, budget=submission.budget,
            parent=submission.parent_task_id, retry=retry, retryable=retry.max_attempts > 1,
            submission=submission if retry.max_attempts > 1 or waits else None, trace=self._traceparent,
            matched=waits, replay=submission.replay,
            handoff=(str(submission.input.get("from", "")), str(submission.input.get("role", "")))
            if submission.handoff and submission.parent_task_id else None,
        )
        if submission.kept is not None:  # a fork's subtask that is not run again (created completed)
            made.submission, made.retryable, made.dispatch = None, False, 0
        if (parent := self.tasks.get(submission.parent_task_id or "")) is not None:
            parent.children.append(submission.task_id)
            self.tasks[submission.task_id].parent_dispatch = parent.dispatch

    def _plan_submitted(self, record: AuditRecord, plan: PlanSubmitted) -> None:
        plan_id = plan.task_id
        children = [step_task_id(plan_id, s.id) for s in plan.steps]
        trace = self._traceparent
        self.tasks[plan_id] = PlanState(
            skill=PLAN_SKILL, submitter=record.principal, status=lifecycle.created(record, Shape.PLAN),
            held=plan if record.code == APPROVAL_REQUESTED else None, children=children, plan=plan,
            parent=plan.parent_task_id, trace=trace, budget=plan.budget, replay=plan.replay,
        )
        self._seen(plan_id, self.tasks[plan_id], record.seq)
        if (parent := self.tasks.get(plan.parent_task_id or "")) is not None:
            parent.children.append(plan_id)
            self.tasks[plan_id].parent_dispatch = parent.dispatch
        for step, child in zip(plan.steps, children, strict=True):
            kept = plan.kept.get(step.id)
            self.tasks[child] = StepState(
                skill=step.skill or "", submitter=record.principal,
                status=lifecycle.created(record, Shape.STEP, step.id), parent=plan_id, dispatch=0, retry=step.retry,
                step=step, deps=tuple(step_task_id(plan_id, d) for d in step.deps), trace=trace,
                retryable=step.retry.max_attempts > 1 and kept is None, replay=plan.replay,
                output=kept.output if kept is not None else None,  # a fork's step that is not run again
            )
            self._seen(child, self.tasks[child], record.seq)

    def _usage(self, record: AuditRecord, usage: TaskUsage) -> None:
        task = self.tasks[usage.task_id]
        tokens = usage.tokens_in + usage.tokens_out
        task.tokens += tokens
        task.cost_usd += usage.cost_usd
        for _, node in self.lineage(usage.task_id):
            node.tree_tokens += tokens
            node.tree_cost_usd += usage.cost_usd
        if record.code == BUDGET_EXCEEDED:
            task.retry, task.error = NO_RETRY, record.reason
            # The lowest task over its budget stops with everything under it.
            owner = next(((tid, node) for tid, node in self.lineage(usage.task_id) if over(node)), None)
            if owner is not None and owner[0] != usage.task_id:
                owner[1].over_budget, owner[1].retry = record.reason, NO_RETRY
                self.dirty.add(owner[0])

    def lineage(self, task_id: str) -> list[tuple[str, AnyTask]]:
        """The task and its ancestors, nearest first (each with its id)."""
        out: list[tuple[str, AnyTask]] = []
        current: str | None = task_id
        while current is not None and (node := self.tasks.get(current)) is not None and len(out) < 64:
            out.append((current, node))
            current = node.parent
        return out

    def budget_left(self, task_id: str) -> tuple[Budget | None, str]:
        """The tightest of the budgets over a task (its own and its ancestors'), as what is
        left of it now, and whose it is; ``(None, "")`` when no budget covers it."""
        tokens: tuple[int, str] | None = None
        cost: tuple[float, str] | None = None
        for tid, node in self.lineage(task_id):
            if node.budget is None:
                continue
            if node.budget.tokens is not None and (tokens is None or node.budget.tokens - node.tree_tokens < tokens[0]):
                tokens = (node.budget.tokens - node.tree_tokens, tid)
            if node.budget.cost_usd is not None and (
                    cost is None or node.budget.cost_usd - node.tree_cost_usd < cost[0]):
                cost = (node.budget.cost_usd - node.tree_cost_usd, tid)
        if tokens is None and cost is None:
            return None, ""
        left = Budget(tokens=max(tokens[0], 1) if tokens else None,
                      cost_usd=max(cost[0], 1e-9) if cost else None)
        return left, (tokens or cost or (0, ""))[1]

    def _approved(self, record: AuditRecord, approved: TaskApproved) -> None:
        task = self.tasks[approved.task_id]
        if isinstance(task, PlanState):
            task.held = None

    def _denied(self, record: AuditRecord, denied: TaskDenied) -> None:
        task = self.tasks[denied.task_id]
        if isinstance(task, TaskState | PlanState):
            task.held = None

    def _started(self, record: AuditRecord, claim: TaskStarted) -> None:
        task = self.tasks[claim.task_id]
        task.claimant, task.attempt = record.principal, claim.attempt
        if isinstance(task, TaskState):
            task.held = None

    def _claimed(self, record: AuditRecord, result: TaskCompleted | TaskFailed) -> None:
        """A result that carries its claim is the claim too (folded first)."""
        if (claim := lifecycle.claim_of(result)) is not None:
            self._started(record, claim)

    def _completed(self, record: AuditRecord, done: TaskCompleted) -> None:
        self._claimed(record, done)
        task = self.tasks[done.task_id]
        if isinstance(task, TaskState):
            task.submission = None
        elif isinstance(task, StepState):
            task.output = done.output

    def _failed(self, record: AuditRecord, failed: TaskFailed) -> None:
        self._claimed(record, failed)
        task = self.tasks[failed.task_id]
        task.error = failed.error
        task.failures += 1

    def _dispatched(self, record: AuditRecord, dispatched: TaskDispatched) -> None:
        task = self.tasks[dispatched.task_id]
        task.skill, task.dispatch, task.retry_at = dispatched.skill, dispatched.dispatch, None
        task.routed, task.dispatch_seq, task.dispatch_trace = True, record.seq, self._traceparent
        self.unmatched.discard(dispatched.task_id)
        self.ready_since.pop(dispatched.task_id, None)
        if task.agent:
            self._release(dispatched.task_id, task)
        if dispatched.agent:
            task.agent = dispatched.agent
            self.inflight.setdefault(dispatched.agent, set()).add(dispatched.task_id)
        for child in task.children:
            self.dirty.add(child)  # a subtask of a superseded attempt is cancelled

    def _handed_off(self, record: AuditRecord, handoff: Handoff) -> None:
        self.tasks[handoff.task_id].handed = True

    def _retry_scheduled(self, record: AuditRecord, retry: TaskRetryScheduled) -> None:
        self.tasks[retry.task_id].retry_at = retry.not_before
        heapq.heappush(self._timers, (retry.not_before, retry.task_id))

    def _dead_lettered(self, record: AuditRecord, dead: TaskDeadLettered) -> None:
        task = self.tasks[dead.task_id]
        task.error = dead.reason
        if isinstance(task, TaskState):
            task.submission = None

    def _cancelled(self, record: AuditRecord, cancel: TaskCancelled) -> None:
        task = self.tasks[cancel.task_id]
        task.error, task.retry_at = cancel.reason, None
        if isinstance(task, TaskState):
            task.submission, task.held = None, None
        elif isinstance(task, PlanState):
            task.held = None
        self.unmatched.discard(cancel.task_id)

    def _unmatched(self, record: AuditRecord, unmatched: SkillUnmatched) -> None:
        task = self.tasks[unmatched.task_id]
        if task.agent:
            self._release(unmatched.task_id, task)
        self.unmatched.add(unmatched.task_id)
        self.proposals[unmatched.id] = unmatched

    def _proposal_approved(self, record: AuditRecord, approved: ProposalApproved) -> None:
        self.approved_proposals.add(approved.proposal_id)

    def _joined(self, record: AuditRecord, joined: AgentJoined) -> None:
        for skill in joined.skills:
            self.registry.setdefault(skill, set()).update(joined.capabilities.get(skill, ()))
            self.joined_at[skill] = record.at

    def _checkpoint_saved(self, record: AuditRecord, saved: CheckpointSaved) -> None:
        self.checkpoints.setdefault(saved.agent, {})[saved.checkpoint_id] = record.seq

    def _seen(self, task_id: str, task: AnyTask, seq: int) -> None:
        """A record about the task was folded (``seq``)."""
        task.last_seq = seq
        self._recent.pop(task_id, None)
        self._recent[task_id] = seq

    def _archived(self, through: int) -> None:
        """Let go of every task tree settled by ``through`` (:mod:`bus.compaction`) and of
        everything kept about its tasks; open trees stay whole."""
        recent, tasks = self._recent, self.tasks
        candidates: list[str] = []
        while recent:
            task_id, seq = recent.popitem(last=False)
            if seq > through:
                recent[task_id] = seq
                recent.move_to_end(task_id, last=False)
                break
            candidates.append(task_id)
        self.archived_through = max(self.archived_through, through)
        closed = compaction.closed
        gone: set[str] = set()
        # A held task's children are held: a tree leaves whole.
        for tree in compaction.trees(candidates, lambda t: parent if (parent := tasks[t].parent) in tasks else None,
                                     lambda t: tasks[t].children):
            for t in tree:
                task = tasks[t]
                if not closed(task.status, task.retryable, task.last_seq, through):
                    break
            else:
                gone.update(tree)
        if not gone:
            return
        self.archived_tasks += len(gone)
        for task_id in gone:
            del tasks[task_id]  # not in recent: its last record is at or before the cut
        for held in (*self.inflight.values(), *self.held.values()):
            held.difference_update(gone)
        for ids in (self.unmatched, self.dirty, self.orphaned):
            ids.difference_update(gone)
        for task_id in gone & self.ready_since.keys():
            del self.ready_since[task_id]
        if any(task_id in gone for _, task_id in self._timers):
            self._timers = [timer for timer in self._timers if timer[1] not in gone]
            heapq.heapify(self._timers)
        dropped = [pid for pid, unmatched in self.proposals.items() if unmatched.task_id in gone]
        for pid in dropped:
            del self.proposals[pid]
            self.approved_proposals.discard(pid)

    def _traced(self, task_id: str, traceparent: str) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        task.trace = traceparent
        if isinstance(task, StepState) and (plan := self.tasks.get(task.parent or "")) is not None:
            plan.trace = traceparent

    def cause(self, task_id: str) -> str:
        """The ``traceparent`` a decision about ``task_id`` is traced under: the latest
        record about it, or, for a plan step, about its plan (a finished dependency is
        what dispatches the next step)."""
        task = self.tasks.get(task_id)
        if task is None:
            return ""
        if isinstance(task, StepState) and (plan := self.tasks.get(task.parent or "")) is not None:
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


_Fold = Callable[[RouterState, AuditRecord, Any], None]
_FOLDS: dict[type, _Fold] = {
    TaskSubmitted: RouterState._submitted,
    PlanSubmitted: RouterState._plan_submitted,
    TaskUsage: RouterState._usage,
    TaskApproved: RouterState._approved,
    TaskDenied: RouterState._denied,
    TaskStarted: RouterState._started,
    TaskCompleted: RouterState._completed,
    TaskFailed: RouterState._failed,
    TaskDispatched: RouterState._dispatched,
    Handoff: RouterState._handed_off,
    TaskRetryScheduled: RouterState._retry_scheduled,
    TaskDeadLettered: RouterState._dead_lettered,
    TaskCancelled: RouterState._cancelled,
    SkillUnmatched: RouterState._unmatched,
    ProposalApproved: RouterState._proposal_approved,
    AgentJoined: RouterState._joined,
    CheckpointSaved: RouterState._checkpoint_saved,
}
"""Event type → what an accepted record of it does to the state besides the task's status
(which :func:`bus.lifecycle.after` decides); a type not here changes nothing. Every task
event has an entry (tests/test_lifecycle.py checks), and each handler is small."""

_UNCHANGED = frozenset({TaskProgress})
"""Task events that change nothing the router keeps (the projection shows them)."""

_CREATES = frozenset({TaskSubmitted, PlanSubmitted})
"""Records that create their task (its status comes from :func:`bus.lifecycle.created`)."""

_ASSIGNED = frozenset({Status.PENDING, Status.RUNNING})
"""Statuses in which a task assigned to an agent holds one of its slots."""

