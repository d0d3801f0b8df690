"""The ``agents`` projection: who joined, with which skills, and what they have done."""

from __future__ import annotations

import aiosqlite

from bus import codec
from bus.events import AgentJoined, AgentLeft, AuditRecord, TaskCompleted, TaskFailed
from projections.tasks import agent_name


async def apply(db: aiosqlite.Connection, record: AuditRecord) -> None:
    """Apply one audit record to the agents table (rejected records change nothing)."""
    if not record.accepted:
        return
    name = agent_name(record.principal)
    at = record.at.isoformat()
    match record.event:
        case AgentJoined() as e:
            await db.execute(
                "INSERT INTO agents (name, instance, skills, concurrency, status, joined_at, updated_seq)"
                " VALUES (?, ?, ?, ?, 'online', ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " instance = excluded.instance, skills = excluded.skills, concurrency = excluded.concurrency,"
                " status = 'online', joined_at = excluded.joined_at, left_at = NULL,"
                " updated_seq = excluded.updated_seq",
                (name, e.instance, codec.encode(e.skills).decode(), e.concurrency, at, record.seq),
            )
        case AgentLeft() as e:
            # Several replicas may share a name: the agent is offline only when its
            # latest instance leaves.
            await db.execute(
                "UPDATE agents SET status = 'offline', left_at = ?, updated_seq = ? WHERE name = ? AND instance = ?",
                (at, record.seq, name, e.instance),
            )
        case TaskCompleted():
            await db.execute(
                "UPDATE agents SET tasks_completed = tasks_completed + 1, updated_seq = ? WHERE name = ?",
                (record.seq, name),
            )
        case TaskFailed():
            await db.execute(
                "UPDATE agents SET tasks_failed = tasks_failed + 1, updated_seq = ? WHERE name = ?",
                (record.seq, name),
            )
        case _:
            pass
