"""The ``tasks`` projection: one row per accepted submission, following its lifecycle.

Subtasks are tasks whose ``parent_task_id`` names the task whose skill submitted them,
or the plan they are a step of. A plan is a row with skill ``plan`` (its input is the
plan), and each of its steps a row with its ``step`` id, ``deps`` and ``priority``; the
router's own decisions (dispatch, retry, dead letter, skip, no match) move them along.
A submission whose skill nobody served (code ``no_agent`` or ``awaiting_match``) shows why
in ``progress`` until an agent claims it.

An ``audit_archived`` record deletes every task tree settled by its ``through_seq``, as the
router's state lets go of them (:mod:`bus.compaction`); the tables that refer to tasks
follow (:mod:`projections.compaction`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ledgerbus.bus import codec, compaction, lifecycle, subjects
from ledgerbus.bus.events import (
    NO_RETRY,
    PLAN_SKILL,
    TASK_EVENTS,
    Handoff,
    PlanSubmitted,
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
from ledgerbus.bus.lifecycle import APPROVAL_REQUESTED, AWAITING_MATCH, BUDGET_EXCEEDED, NO_AGENT, Shape, Status
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.compaction import settled_trees
from ledgerbus.projections.db import iso
from ledgerbus.projections.rows import Rows, reads

COLUMNS = (
    "task_id", "kind", "skill", "input", "timeout_s", "status", "submitted_by", "submitted_at", "submitted_seq",
    "parent_task_id", "agent", "attempts", "started_at", "finished_at", "progress", "fraction", "output", "error",
    "trace_id", "tokens", "cost_usd", "step", "deps", "needs", "priority", "dispatches", "retry_at", "retryable",
    "updated_seq",
)
_STEP_DEFAULTS = {"step": None, "deps": None, "needs": None, "priority": None, "retry_at": None}


@functools.lru_cache(maxsize=4096)
def agent_name(principal: str) -> str:
    """``agent-echo-1`` → ``echo-1`` (the name people gave the agent)."""
    try:
        return subjects.parse_principal(principal).name or principal
    except subjects.SubjectError:
        return principal


_KINDS = frozenset(TASK_EVENTS)
_CREATES = frozenset((TaskSubmitted, PlanSubmitted))


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Fold a batch of audit records into the tasks table (rejected records change nothing)."""
    mine = [r for r in records if r.verdict == "accepted" and (type(r.event) in _KINDS or r.retention is not None)]
    if not mine:
        return
    rows = batch.rows("tasks", ("task_id",), COLUMNS)
    await rows.load(batch.fetch, reads(_refs(mine)))
    for record in mine:
        event = record.event
        if event is None:  # a retention record: the only one let in without an event
            if (through := compaction.archived_through(record)) is not None:
                batch.archived[record.seq] = await _compact(batch, rows, through)
            continue
        _FOLDS[type(event)](rows, record, event)
        row = rows.get((event.task_id,))  # type: ignore[union-attr]
        if row is None:
            continue
        if row["retryable"] and compaction.stops_retries(record):
            rows.update((row["task_id"],), retryable=0)
        if type(event) not in _CREATES:
            # One definition of what each record does to a status: bus/lifecycle.py.
            status = lifecycle.after(Status(row["status"]), record, _shape(row))
            if status != row["status"]:
                rows.update((row["task_id"],), status=str(status))
    rows.store(batch.plan)


async def _compact(batch: Batch, rows: Rows, through: int) -> list[str]:
    """Delete every task tree settled by ``through``; return the ids deleted, in order."""
    gone = await settled_trees(batch, rows, through)
    for task_id in gone:
        rows.delete((task_id,))
    return gone


def _shape(row: dict[str, Any]) -> Shape:
    return Shape.PLAN if row["kind"] == "plan" else Shape.STEP if row["step"] is not None else Shape.TASK


def _refs(records: Sequence[AuditRecord]) -> Iterator[tuple[tuple[str], bool]]:
    """Each record's task, and whether the record creates it (a plan creates its steps too)."""
    for r in records:
        e = r.event
        if e is None:  # an archive
            continue
        yield (e.task_id,), type(e) in _CREATES  # type: ignore[union-attr]
        if type(e) is PlanSubmitted:
            for s in e.steps:
                yield (step_task_id(e.task_id, s.id),), True


def _submitted(rows: Rows, record: AuditRecord, e: TaskSubmitted) -> None:
    held = record.code == APPROVAL_REQUESTED
    # Nobody served the skill: queued all the same (no_agent), or held for the router to
    # match it (awaiting_match). Either way the row says so until an agent claims it.
    waits = record.code == AWAITING_MATCH
    unserved = waits or record.code == NO_AGENT
    seq = record.seq
    rows.put({
        "task_id": e.task_id, "kind": "task", "skill": e.skill, "input": codec.encode(e.input).decode(),
        "timeout_s": e.timeout_s,
        "status": str(lifecycle.created(record, Shape.TASK)),
        "submitted_by": record.principal, "submitted_at": iso(record.at), "submitted_seq": seq,
        "parent_task_id": e.parent_task_id, "agent": None, "attempts": 0, "started_at": None,
        "finished_at": None, "progress": record.reason if unserved else None, "fraction": None, "output": None,
        "error": None, "trace_id": record.trace_id, "tokens": 0, "cost_usd": 0.0, **_STEP_DEFAULTS,
        "dispatches": 0 if held or waits else 1, "retryable": int((e.retry or NO_RETRY).max_attempts > 1),
        "updated_seq": seq,
    })
    if e.kept is not None:  # a fork's subtask that is not run again
        rows.update((e.task_id,), output=codec.encode(e.kept.output).decode(), finished_at=iso(record.at),
                    progress=f"kept from {e.kept.source_task_id}", dispatches=0, retryable=0)


def _plan_submitted(rows: Rows, record: AuditRecord, e: PlanSubmitted) -> None:
    held = record.code == APPROVAL_REQUESTED
    at = iso(record.at)
    seq = record.seq
    common = {
        "submitted_by": record.principal, "submitted_at": at, "submitted_seq": seq, "agent": None,
        "attempts": 0, "finished_at": None, "progress": None, "fraction": None, "output": None,
        "error": None, "trace_id": record.trace_id, "tokens": 0, "cost_usd": 0.0, "dispatches": 0,
        "retry_at": None, "updated_seq": seq,
    }
    rows.put({
        **common, "task_id": e.task_id, "kind": "plan", "skill": PLAN_SKILL,
        "input": codec.encode({"name": e.name, "steps": e.steps}).decode(),
        "timeout_s": max(s.timeout_s for s in e.steps), "status": str(lifecycle.created(record, Shape.PLAN)),
        "parent_task_id": e.parent_task_id, "started_at": None if held else at, "step": None, "deps": None,
        "needs": None, "priority": None, "retryable": 0,
    })
    for s in e.steps:
        row = {
            **common, "task_id": step_task_id(e.task_id, s.id), "kind": "task", "skill": s.skill or "",
            "input": codec.encode(s.input).decode(), "timeout_s": s.timeout_s,
            "status": str(lifecycle.created(record, Shape.STEP, s.id)),
            "parent_task_id": e.task_id, "started_at": None, "step": s.id,
            "deps": codec.encode(s.deps).decode(),
            "needs": codec.encode(s.capabilities).decode() if s.capabilities else None, "priority": s.priority,
            "retryable": int(s.retry.max_attempts > 1),
        }
        if (kept := e.kept.get(s.id)) is not None:  # a fork's step that is not run again (created completed)
            row.update(output=codec.encode(kept.output).decode(), finished_at=at,
                       progress=f"kept from {kept.source_task_id}", retryable=0)
        rows.put(row)


def _approved(rows: Rows, record: AuditRecord, e: TaskApproved) -> None:
    row = rows.get((e.task_id,))
    if row is None:
        return
    plan = row["kind"] == "plan"
    rows.update((e.task_id,), started_at=iso(record.at) if plan else None,
                dispatches=row["dispatches"] if plan else 1, progress=f"approved by {record.principal}",
                updated_seq=record.seq)


def _dispatched(rows: Rows, record: AuditRecord, e: TaskDispatched) -> None:
    where = f" to {e.agent}" if e.agent else ""
    score = f", score {e.score:g}" if e.score is not None and e.reason != "retry" else ""
    progress = None if e.reason == "ready" and not e.agent else f"dispatched{where} ({e.reason}{score})"
    rows.update((e.task_id,), skill=e.skill, dispatches=e.dispatch, retry_at=None,
                finished_at=None, progress=progress, updated_seq=record.seq)


def _handed_off(rows: Rows, record: AuditRecord, e: Handoff) -> None:
    who = e.from_role or e.from_task
    rows.update((e.task_id,), progress=f"handed over by {who} ({e.from_task})", updated_seq=record.seq)


def _retry_scheduled(rows: Rows, record: AuditRecord, e: TaskRetryScheduled) -> None:
    rows.update((e.task_id,), retry_at=iso(e.not_before), updated_seq=record.seq)


def _dead_lettered(rows: Rows, record: AuditRecord, e: TaskDeadLettered) -> None:
    rows.update((e.task_id,), error=e.reason, finished_at=iso(record.at),
                updated_seq=record.seq)


def _cancelled(rows: Rows, record: AuditRecord, e: TaskCancelled) -> None:
    who = "" if record.principal == "router" else f" by {record.principal}"
    rows.update((e.task_id,), retry_at=None,
                error=e.reason or f"cancelled{who}", finished_at=iso(record.at), updated_seq=record.seq)


def _unmatched(rows: Rows, record: AuditRecord, e: SkillUnmatched) -> None:
    rows.update((e.task_id,), updated_seq=record.seq,
                progress=f"no live agent offers {', '.join(e.capabilities)} (proposal {e.id})")


def _usage(rows: Rows, record: AuditRecord, e: TaskUsage) -> None:
    row = rows.get((e.task_id,))
    if row is None:
        return
    changes: dict[str, object] = {
        "tokens": row["tokens"] + e.tokens_in + e.tokens_out,
        "cost_usd": row["cost_usd"] + e.cost_usd,
        "updated_seq": record.seq,
    }
    if record.code == BUDGET_EXCEEDED:
        changes.update(error=f"budget exceeded: {record.reason}", finished_at=iso(record.at))
    rows.update((e.task_id,), **changes)


def _denied(rows: Rows, record: AuditRecord, e: TaskDenied) -> None:
    error = f"denied by {record.principal}" + (f": {e.reason}" if e.reason else "")
    rows.update((e.task_id,), error=error, finished_at=iso(record.at), updated_seq=record.seq)


def _started(rows: Rows, record: AuditRecord, e: TaskStarted) -> None:
    row = rows.get((e.task_id,))
    if row is None:
        return
    # A new attempt: what the last one left (its end, its error) no longer describes the task.
    rows.update((e.task_id,), agent=agent_name(record.principal),
                attempts=row["attempts"] + 1, started_at=iso(record.at), finished_at=None, error=None, progress=None,
                fraction=None, updated_seq=record.seq)


def _progress(rows: Rows, record: AuditRecord, e: TaskProgress) -> None:
    rows.update((e.task_id,), progress=e.message, fraction=e.fraction, updated_seq=record.seq)


def _claimed(rows: Rows, record: AuditRecord, e: TaskCompleted | TaskFailed) -> None:
    """A result that carries its claim starts the attempt it ends (folded first)."""
    if (claim := lifecycle.claim_of(e)) is not None:
        _started(rows, record, claim)


def _completed(rows: Rows, record: AuditRecord, e: TaskCompleted) -> None:
    _claimed(rows, record, e)
    rows.update((e.task_id,), output=codec.encode(e.output).decode(),
                finished_at=iso(record.at), updated_seq=record.seq)


def _failed(rows: Rows, record: AuditRecord, e: TaskFailed) -> None:
    _claimed(rows, record, e)
    rows.update((e.task_id,), error=e.error, finished_at=iso(record.at), updated_seq=record.seq)


_FOLDS: dict[type, Callable[[Rows, AuditRecord, Any], None]] = {
    TaskSubmitted: _submitted,
    PlanSubmitted: _plan_submitted,
    TaskApproved: _approved,
    TaskDispatched: _dispatched,
    Handoff: _handed_off,
    TaskRetryScheduled: _retry_scheduled,
    TaskDeadLettered: _dead_lettered,
    TaskCancelled: _cancelled,
    SkillUnmatched: _unmatched,
    TaskUsage: _usage,
    TaskDenied: _denied,
    TaskStarted: _started,
    TaskProgress: _progress,
    TaskCompleted: _completed,
    TaskFailed: _failed,
}
assert set(_FOLDS) == _KINDS, "every task event has a fold"
