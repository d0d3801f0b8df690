"""What the router knows of each task, by shape: a plain task, a plan, a step of a plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from ledgerbus.bus import lifecycle
from ledgerbus.bus.events import NO_RETRY, Budget, PlanStep, PlanSubmitted, Replay, RetryPolicy, TaskSubmitted
from ledgerbus.bus.lifecycle import TERMINAL, Shape, Status


@dataclass(slots=True)
class _Task:
    """What the router knows of any task; the three shapes below add their own."""

    skill: str
    submitter: str = ""
    status: Status = Status.PENDING
    claimant: str = ""
    attempt: int = 0
    dispatch: int = 1
    budget: Budget | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    retry: RetryPolicy = NO_RETRY
    failures: int = 0
    retry_at: datetime | None = None
    error: str = ""
    dispatch_seq: int = 0
    """The audit seq of the record that made the current dispatch."""
    routed: bool = False
    """Its current dispatch is the router's own (``task_dispatched``), not the submission's."""
    trace: str = ""
    """The ``traceparent`` of the latest record about the task (for a plan, about any of
    its steps): the router's next decision about it is a span under its cause."""
    dispatch_trace: str = ""
    """The ``traceparent`` of the record of its current routed dispatch."""
    agent: str = ""
    """The agent its current dispatch is assigned to; empty: a skill's shared queue."""
    parent_dispatch: int = 0
    """The dispatch of its parent when a skill submitted it (a subtask): a later dispatch of
    the parent supersedes the attempt that made it, and it is cancelled."""
    handed: bool = False
    """Its ``handoff`` is recorded (a role step, or a subtask a skill handed its work to)."""
    tree_tokens: int = 0
    """Tokens used by the task and everything under it (what its budget covers)."""
    tree_cost_usd: float = 0.0
    over_budget: str = ""
    """Why its tree went over its budget: it stops (the scheduler fails or cancels it)."""
    last_seq: int = 0
    """The seq of the last accepted record about it (what an archive compares with)."""
    retryable: bool = False
    """Its policy allows another run after a failure, as the log shows it (see
    :func:`bus.compaction.stops_retries`): what decides whether a failure settles it when
    an archive lets go of settled trees. Never looser than :attr:`retry`."""
    replay: Replay | None = None
    """Its LLM calls are answered from this recording (a fork's or a re-run's): its work
    items say so, and its skill passes it on to what it submits."""

    shape: ClassVar[Shape]

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
        return lifecycle.settled(self.status, self.retry.max_attempts > 1)


@dataclass(slots=True)
class TaskState(_Task):
    """A task submitted on its own (``task_submitted``)."""

    held: TaskSubmitted | None = None
    """The submission, kept while it waits for (and until it is dispatched by) approval."""
    submission: TaskSubmitted | None = None
    """Kept while a retry, or a match, may need to dispatch the task again."""
    matched: bool = False
    """Held for a match at submission (``awaiting_match``): every dispatch of it is
    assigned to the agent that fits it, not to its skill's shared queue."""
    handoff: tuple[str, str] | None = None
    """Handed over by its parent's skill (``ctx.handoff``): (from, to role), until the
    router records the ``handoff``."""

    shape: ClassVar[Shape] = Shape.TASK


@dataclass(slots=True, kw_only=True)
class PlanState(_Task):
    """A plan: the router runs it, no agent claims it; its children are its steps."""

    plan: PlanSubmitted
    held: PlanSubmitted | None = None
    """The plan, kept while it waits for approval."""

    shape: ClassVar[Shape] = Shape.PLAN


@dataclass(slots=True, kw_only=True)
class StepState(_Task):
    """One step of a plan, dispatched by the scheduler once its dependencies completed."""

    step: PlanStep
    deps: tuple[str, ...] = ()
    """The task ids of the steps it depends on."""
    output: Any = None
    """The context of the steps that depend on it."""

    shape: ClassVar[Shape] = Shape.STEP


AnyTask = TaskState | PlanState | StepState
"""A task of any shape: ``match`` or ``isinstance`` on it narrows to the one in hand."""


def over(task: _Task) -> bool:
    """Whether the task's tree has spent more than its budget."""
    budget = task.budget
    return budget is not None and ((budget.tokens is not None and task.tree_tokens > budget.tokens)
                                   or (budget.cost_usd is not None and task.tree_cost_usd > budget.cost_usd))
