"""Plans for ``agentctl submit --plan FILE``: reading a plan file, and following a plan run.

A plan file is YAML or JSON (chosen by its suffix; ``-`` reads JSON or YAML from stdin)
with a ``steps`` list and an optional ``name``; see docs/orchestration.md. It is decoded
with the router's own schema, and the checks that need no bus (unique ids, known
dependencies, no cycles) run here too, so a typo is reported before anything is sent.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml

from ledgerbus.bus import codec, lifecycle
from ledgerbus.bus.errors import SchemaError
from ledgerbus.bus.events import (
    Claim,
    PlanSubmitted,
    SkillUnmatched,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDenied,
    TaskDispatched,
    TaskFailed,
    TaskProgress,
    TaskRetryScheduled,
    TaskStarted,
    new_id,
    step_task_id,
)
from ledgerbus.bus.lifecycle import Shape, Status
from ledgerbus.bus.plans import validate
from ledgerbus.bus.records import AuditRecord


class PlanFileError(ValueError):
    """The plan file cannot be read or is not a valid plan; the message says where."""


def read_plan(path: str, task_id: str | None = None) -> PlanSubmitted:
    """Read a plan file into a :class:`PlanSubmitted` (a fresh event id, and task id
    unless given), checked for everything that does not need the bus."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise PlanFileError(f"{path}: {exc.strerror}") from exc
    return parse_plan(text, path, task_id)


def parse_plan(text: str, path: str = "plan", task_id: str | None = None) -> PlanSubmitted:
    """:func:`read_plan` for a plan file's text (``path`` names it in errors)."""
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise PlanFileError(f"{path}: not valid YAML or JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PlanFileError(f"{path}: a plan is a mapping with a 'steps' list, not {type(data).__name__}")
    body = {"kind": "plan_submitted", "id": new_id(), "task_id": task_id or data.pop("task_id", None) or new_id(), **data}
    try:
        plan = codec.decode_event(codec.encode(body))
    except SchemaError as exc:
        raise PlanFileError(f"{path}: {exc}") from exc
    except (TypeError, msgspec.EncodeError) as exc:
        raise PlanFileError(f"{path}: {exc}") from exc
    assert isinstance(plan, PlanSubmitted)
    problem = check_shape(plan)
    if problem is not None:
        raise PlanFileError(f"{path}: {problem}")
    return plan


def check_shape(plan: PlanSubmitted) -> str | None:
    """The router's plan checks that need no state (the router repeats them)."""
    skills = {s.skill for s in plan.steps if s.skill is not None}
    return validate(plan, skills)  # skill names are the router's to judge: it knows the registry


@dataclass
class StepView:
    """One step as the log tells it."""

    step: str
    skill: str
    deps: list[str]
    priority: int
    status: Status = Status.WAITING
    agent: str = ""
    attempts: int = 0
    dispatches: int = 0
    started: datetime | None = None
    finished: datetime | None = None
    note: str = ""

    @property
    def seconds(self) -> float | None:
        """How long its last run took (or has taken so far)."""
        if self.started is None:
            return None
        return ((self.finished or self.started).timestamp() - self.started.timestamp())


@dataclass
class PlanView:
    """A plan and its steps, folded from their audit records (``submit --plan --wait``)."""

    plan: PlanSubmitted
    status: Status = Status.SUBMITTED
    code: str = ""
    reason: str = ""
    output: Any = None
    error: str = ""
    steps: dict[str, StepView] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    submitted_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        for s in self.plan.steps:
            tid = step_task_id(self.plan.task_id, s.id)
            label = s.skill or "needs " + ",".join(s.capabilities)
            self.steps[tid] = StepView(s.id, label, list(s.deps), s.priority)
        self.keys = {self.plan.task_id, *self.steps}

    @property
    def terminal(self) -> bool:
        """Whether the plan has ended (or was rejected): a plan is never retried."""
        return lifecycle.settled(self.status, retryable=False)

    def apply(self, record: AuditRecord) -> None:
        """Fold one record (of the plan or of one of its steps)."""
        if record.key == self.plan.task_id:
            self._plan_record(record)
        elif (step := self.steps.get(record.key)) is not None and record.accepted:
            _step_record(step, record)

    def _plan_record(self, record: AuditRecord) -> None:
        if record.msg_id == self.plan.id:
            self.submitted_at = record.at
            self.status = lifecycle.created(record, Shape.PLAN)
            if not record.accepted:
                self.code, self.reason = record.code, record.reason
                return
            for step in self.steps.values():  # a fork's kept steps are done already
                if (status := lifecycle.created(record, Shape.STEP, step.step)) is not Status.WAITING:
                    step.status, step.note = status, f"kept from {self.plan.kept[step.step].source_task_id}"
            return
        if not record.accepted:
            return
        self.status = lifecycle.after(self.status, record, Shape.PLAN)
        match record.event:
            case TaskCompleted(output=output):
                self.output, self.finished_at = output, record.at
            case TaskFailed(error=error) | TaskCancelled(reason=error):
                self.error, self.finished_at = error, record.at
            case TaskDenied():
                self.finished_at = record.at

    def as_json(self) -> dict[str, Any]:
        """The view for ``--json``."""
        return {
            "task_id": self.plan.task_id, "status": self.status, "code": self.code, "reason": self.reason,
            "output": self.output, "error": self.error,
            "steps": {s.step: {"task_id": tid, "skill": s.skill, "status": s.status, "agent": s.agent,
                               "attempts": s.attempts, "seconds": s.seconds, "note": s.note}
                      for tid, s in self.steps.items()},
        }


def _step_record(step: StepView, record: AuditRecord) -> None:
    step.status = lifecycle.after(step.status, record, Shape.STEP)
    match record.event:
        case TaskDispatched(skill=skill, dispatch=dispatch):
            step.skill, step.dispatches, step.note = skill, dispatch, ""
        case TaskStarted() | TaskCompleted(claim=Claim()) | TaskFailed(claim=Claim()):
            # A result that carries its claim starts the attempt it ends.
            step.agent = record.principal.removeprefix("agent-")
            step.attempts += 1
            step.started, step.finished = record.at, None
    match record.event:
        case TaskProgress(message=message):
            step.note = message
        case TaskCompleted():
            step.finished = record.at
        case TaskFailed(error=error):
            step.finished, step.note = record.at, error
        case TaskRetryScheduled(not_before=at):
            step.note = f"retry at {at:%H:%M:%S}"
        case TaskDeadLettered(reason=reason):
            step.note = reason
        case TaskCancelled(reason=reason):
            step.note = reason
            step.finished = step.finished or (record.at if step.started else None)
        case SkillUnmatched(proposal=proposal, id=proposal_id):
            step.note = f"no live agent; proposal {proposal_id} ({proposal.name}: {', '.join(proposal.skills)})"
        case _:
            pass

