"""The ``tasks`` projection: one row per accepted submission, following its lifecycle."""

from __future__ import annotations

import aiosqlite

from bus import codec, subjects
from bus.events import (
    AuditRecord,
    TaskApproved,
    TaskCompleted,
    TaskDenied,
    TaskFailed,
    TaskProgress,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
)


def agent_name(principal: str) -> str:
    """``agent-echo-1`` → ``echo-1`` (the name people gave the agent)."""
    try:
        return subjects.parse_principal(principal).name or principal
    except subjects.SubjectError:
        return principal


async def apply(db: aiosqlite.Connection, record: AuditRecord) -> None:
    """Apply one audit record to the tasks table (rejected records change nothing)."""
    if not record.accepted:
        return
    at = record.at.isoformat()
    match record.event:
        case TaskSubmitted() as e:
            status = "awaiting_approval" if record.code == "approval_requested" else "pending"
            await db.execute(
                "INSERT INTO tasks (task_id, skill, input, timeout_s, status, submitted_by, submitted_at,"
                " submitted_seq, trace_id, updated_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.task_id, e.skill, codec.encode(e.input).decode(), e.timeout_s, status, record.principal, at,
                 record.seq, record.trace_id, record.seq),
            )
        case TaskApproved() as e:
            await db.execute(
                "UPDATE tasks SET status = 'pending', progress = ?, updated_seq = ? WHERE task_id = ?",
                (f"approved by {record.principal}", record.seq, e.task_id),
            )
        case TaskUsage() as e:
            failed = record.code == "budget_exceeded"
            await db.execute(
                "UPDATE tasks SET tokens = tokens + ?, cost_usd = cost_usd + ?,"
                " status = CASE WHEN ? THEN 'failed' ELSE status END,"
                " error = CASE WHEN ? THEN ? ELSE error END,"
                " finished_at = CASE WHEN ? THEN ? ELSE finished_at END, updated_seq = ? WHERE task_id = ?",
                (e.tokens_in + e.tokens_out, e.cost_usd, failed, failed, f"budget exceeded: {record.reason}",
                 failed, at, record.seq, e.task_id),
            )
        case TaskDenied() as e:
            await db.execute(
                "UPDATE tasks SET status = 'denied', error = ?, finished_at = ?, updated_seq = ? WHERE task_id = ?",
                (f"denied by {record.principal}" + (f": {e.reason}" if e.reason else ""), at, record.seq, e.task_id),
            )
        case TaskStarted() as e:
            await db.execute(
                "UPDATE tasks SET status = 'running', agent = ?, attempts = attempts + 1, started_at = ?,"
                " progress = NULL, fraction = NULL, updated_seq = ? WHERE task_id = ?",
                (agent_name(record.principal), at, record.seq, e.task_id),
            )
        case TaskProgress() as e:
            await db.execute(
                "UPDATE tasks SET progress = ?, fraction = ?, updated_seq = ? WHERE task_id = ?",
                (e.message, e.fraction, record.seq, e.task_id),
            )
        case TaskCompleted() as e:
            await db.execute(
                "UPDATE tasks SET status = 'completed', output = ?, finished_at = ?, updated_seq = ?"
                " WHERE task_id = ?",
                (codec.encode(e.output).decode(), at, record.seq, e.task_id),
            )
        case TaskFailed() as e:
            await db.execute(
                "UPDATE tasks SET status = 'failed', error = ?, finished_at = ?, updated_seq = ? WHERE task_id = ?",
                (e.error, at, record.seq, e.task_id),
            )
        case _:
            pass
