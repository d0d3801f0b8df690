"""The ``tasks`` projection: one row per accepted submission, following its lifecycle.

Subtasks are tasks whose ``parent_task_id`` names the task whose skill submitted them,
or the plan they are a step of. A plan is a row with skill ``plan`` (its input is the
plan), and each of its steps a row with its ``step`` id, ``deps`` and ``priority``; the
router's own decisions (dispatch, retry, dead letter, skip, no match) move them along.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import aiosqlite

from bus import codec, subjects
from bus.events import (
    PLAN_SKILL,
    TASK_EVENTS,
    AuditRecord,
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
from projections.db import iso
from projections.rows import Rows

COLUMNS = (
    "task_id", "kind", "skill", "input", "timeout_s", "status", "submitted_by", "submitted_at", "submitted_seq",
    "parent_task_id", "agent", "attempts", "started_at", "finished_at", "progress", "fraction", "output", "error",
    "trace_id", "tokens", "cost_usd", "step", "deps", "needs", "priority", "dispatches", "retry_at", "updated_seq",
)
_STEP_DEFAULTS = {"step": None, "deps": None, "needs": None, "priority": None, "retry_at": None}


@functools.lru_cache(maxsize=4096)
def agent_name(principal: str) -> str:
    """``agent-echo-1`` → ``echo-1`` (the name people gave the agent)."""
    try:
        return subjects.parse_principal(principal).name or principal
    except subjects.SubjectError:
        return principal


async def apply(db: aiosqlite.Connection, records: Sequence[AuditRecord]) -> None:
    """Fold a batch of audit records into the tasks table (rejected records change nothing)."""
    mine = [r for r in records if r.accepted and isinstance(r.event, TASK_EVENTS)]
    if not mine:
        return
    rows = Rows("tasks", ("task_id",), COLUMNS)
    await rows.load(db, ((r.event.task_id,) for r in mine if not isinstance(r.event, TaskSubmitted | PlanSubmitted)))  # type: ignore[union-attr]
    for record in mine:
        fold(rows, record)
    await rows.store(db)


def fold(rows: Rows, record: AuditRecord) -> None:
    """Apply one accepted task event to the batch's rows."""
    at = iso(record.at)
    seq = record.seq
    held = record.code == "approval_requested"
    match record.event:
        case TaskSubmitted() as e:
            rows.put({
                "task_id": e.task_id, "kind": "task", "skill": e.skill, "input": codec.encode(e.input).decode(),
                "timeout_s": e.timeout_s,
                "status": "awaiting_approval" if held else "pending",
                "submitted_by": record.principal, "submitted_at": at, "submitted_seq": seq,
                "parent_task_id": e.parent_task_id, "agent": None, "attempts": 0, "started_at": None,
                "finished_at": None, "progress": None, "fraction": None, "output": None, "error": None,
                "trace_id": record.trace_id, "tokens": 0, "cost_usd": 0.0, **_STEP_DEFAULTS,
                "dispatches": 0 if held else 1, "updated_seq": seq,
            })
        case PlanSubmitted() as e:
            common = {
                "submitted_by": record.principal, "submitted_at": at, "submitted_seq": seq, "agent": None,
                "attempts": 0, "finished_at": None, "progress": None, "fraction": None, "output": None,
                "error": None, "trace_id": record.trace_id, "tokens": 0, "cost_usd": 0.0, "dispatches": 0,
                "retry_at": None, "updated_seq": seq,
            }
            rows.put({
                **common, "task_id": e.task_id, "kind": "plan", "skill": PLAN_SKILL,
                "input": codec.encode({"name": e.name, "steps": e.steps}).decode(),
                "timeout_s": max(s.timeout_s for s in e.steps), "status": "awaiting_approval" if held else "running",
                "parent_task_id": e.parent_task_id, "started_at": None if held else at, "step": None, "deps": None,
                "needs": None, "priority": None,
            })
            for s in e.steps:
                rows.put({
                    **common, "task_id": step_task_id(e.task_id, s.id), "kind": "task", "skill": s.skill or "",
                    "input": codec.encode(s.input).decode(), "timeout_s": s.timeout_s, "status": "waiting",
                    "parent_task_id": e.task_id, "started_at": None, "step": s.id,
                    "deps": codec.encode(s.deps).decode(),
                    "needs": codec.encode(s.capabilities).decode() if s.capabilities else None, "priority": s.priority,
                })
        case TaskApproved(task_id=task_id):
            row = rows.get((task_id,))
            if row is None:
                return
            plan = row["kind"] == "plan"
            rows.update((task_id,), status="running" if plan else "pending", started_at=at if plan else None,
                        dispatches=row["dispatches"] if plan else 1, progress=f"approved by {record.principal}",
                        updated_seq=seq)
        case TaskDispatched(task_id=task_id) as e:
            rows.update((task_id,), status="pending", skill=e.skill, dispatches=e.dispatch, retry_at=None,
                        finished_at=None, progress=None if e.reason == "ready" else f"dispatched ({e.reason})", updated_seq=seq)
        case TaskRetryScheduled(task_id=task_id) as e:
            rows.update((task_id,), status="retrying", retry_at=iso(e.not_before), updated_seq=seq)
        case TaskDeadLettered(task_id=task_id) as e:
            rows.update((task_id,), status="dead_lettered", error=e.reason, finished_at=at, updated_seq=seq)
        case TaskCancelled(task_id=task_id) as e:
            who = "" if record.principal == "router" else f" by {record.principal}"
            rows.update((task_id,), status="skipped" if e.skipped else "cancelled", retry_at=None,
                        error=e.reason or f"cancelled{who}", finished_at=at, updated_seq=seq)
        case SkillUnmatched(task_id=task_id) as e:
            rows.update((task_id,), status="unmatched", updated_seq=seq,
                        progress=f"no live agent offers {', '.join(e.capabilities)} (proposal {e.id})")
        case TaskUsage(task_id=task_id) as e:
            row = rows.get((task_id,))
            if row is None:
                return
            changes: dict[str, object] = {
                "tokens": row["tokens"] + e.tokens_in + e.tokens_out,
                "cost_usd": row["cost_usd"] + e.cost_usd,
                "updated_seq": seq,
            }
            if record.code == "budget_exceeded":
                changes.update(status="failed", error=f"budget exceeded: {record.reason}", finished_at=at)
            rows.update((task_id,), **changes)
        case TaskDenied(task_id=task_id) as e:
            error = f"denied by {record.principal}" + (f": {e.reason}" if e.reason else "")
            rows.update((task_id,), status="denied", error=error, finished_at=at, updated_seq=seq)
        case TaskStarted(task_id=task_id):
            row = rows.get((task_id,))
            if row is None:
                return
            # A new attempt: what the last one left (its end, its error) no longer describes the task.
            rows.update((task_id,), status="running", agent=agent_name(record.principal),
                        attempts=row["attempts"] + 1, started_at=at, finished_at=None, error=None, progress=None,
                        fraction=None, updated_seq=seq)
        case TaskProgress(task_id=task_id) as e:
            rows.update((task_id,), progress=e.message, fraction=e.fraction, updated_seq=seq)
        case TaskCompleted(task_id=task_id) as e:
            rows.update((task_id,), status="completed", output=codec.encode(e.output).decode(), finished_at=at,
                        updated_seq=seq)
        case TaskFailed(task_id=task_id) as e:
            rows.update((task_id,), status="failed", error=e.error, finished_at=at, updated_seq=seq)
        case _:
            pass
