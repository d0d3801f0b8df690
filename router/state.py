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

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from bus.events import (
    AuditRecord,
    Budget,
    CheckpointSaved,
    TaskApproved,
    TaskCompleted,
    TaskDenied,
    TaskFailed,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
)

BUDGET_EXCEEDED = "budget_exceeded"
"""The code of an accepted usage report that took its task over budget: the task fails."""

APPROVAL_REQUESTED = "approval_requested"
"""The code of an accepted submission that waits for approval before it is dispatched."""

TERMINAL = frozenset({"completed", "failed", "denied"})


@dataclass(slots=True)
class TaskState:
    """What the router knows of one task."""

    skill: str
    submitter: str = ""
    status: str = "pending"
    claimant: str = ""
    attempt: int = 0
    held: TaskSubmitted | None = None
    """The submission, kept while it waits for (and until it is dispatched by) approval."""
    budget: Budget | None = None
    tokens: int = 0
    cost_usd: float = 0.0

    @property
    def terminal(self) -> bool:
        """Whether no further result may be accepted for the task."""
        return self.status in TERMINAL


class RouterState:
    """Task lifecycles and recently audited ingress messages."""

    def __init__(self, audited_capacity: int = 65_536, dedup_horizon_s: float = 24 * 3600) -> None:
        self.tasks: dict[str, TaskState] = {}
        self.last_checkpoint_seq = 0
        self.checkpoints: dict[str, dict[str, int]] = {}
        """agent name → its memory checkpoints' ids → the seq that saved each"""
        self._audited: OrderedDict[int, AuditRecord] = OrderedDict()
        self._capacity = audited_capacity
        # message id -> (seq, time) of accepted records, oldest first, for dedup_horizon_s.
        self._messages: OrderedDict[str, tuple[int, datetime]] = OrderedDict()
        self._horizon = timedelta(seconds=dedup_horizon_s)

    def apply(self, record: AuditRecord) -> None:
        """Fold one audit record into the state."""
        if record.checkpoint is not None:
            self.last_checkpoint_seq = record.seq
            return
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
        match record.event:
            case TaskSubmitted(task_id=task_id, skill=skill) as submission:
                held = record.code == APPROVAL_REQUESTED
                self.tasks[task_id] = TaskState(
                    skill=skill,
                    submitter=record.principal,
                    status="awaiting_approval" if held else "pending",
                    held=submission if held else None,
                    budget=submission.budget,
                )
            case TaskUsage(task_id=task_id) as usage:
                task = self.tasks[task_id]
                task.tokens += usage.tokens_in + usage.tokens_out
                task.cost_usd += usage.cost_usd
                if record.code == BUDGET_EXCEEDED:
                    task.status = "failed"
            case TaskApproved(task_id=task_id):
                self.tasks[task_id].status = "pending"
            case TaskDenied(task_id=task_id):
                self.tasks[task_id].status, self.tasks[task_id].held = "denied", None
            case TaskStarted(task_id=task_id, attempt=attempt):
                task = self.tasks[task_id]
                task.status, task.claimant, task.attempt = "running", record.principal, attempt
                task.held = None
            case TaskCompleted(task_id=task_id):
                self.tasks[task_id].status = "completed"
            case TaskFailed(task_id=task_id):
                self.tasks[task_id].status = "failed"
            case CheckpointSaved(agent=agent, checkpoint_id=cid):
                self.checkpoints.setdefault(agent, {})[cid] = record.seq
            case _:
                pass

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
