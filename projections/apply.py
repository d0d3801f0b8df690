"""Applying a batch of audit records: every projection plus the tracking row, one transaction.

Records at or below the tracking position are skipped, so re-delivering a batch (after
a crash, or to a replay) changes nothing. Each projection folds the whole batch and
writes it with a handful of ``executemany`` calls (see :mod:`projections.rows`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence

import aiosqlite

from bus import failpoints
from bus.events import AuditRecord
from projections import agents, approvals, audit_index, checkpoints, memory, proposals, shared, tasks, usage
from projections import db as dbmod
from projections.errors import DatabaseError

Projection = Callable[[aiosqlite.Connection, Sequence[AuditRecord]], Awaitable[None]]

PROJECTIONS: dict[str, Projection] = {
    "tasks": tasks.apply,
    "agents": agents.apply,
    "approvals": approvals.apply,
    "audit_index": audit_index.apply,
    "memory": memory.apply,
    "checkpoints": checkpoints.apply,
    "shared": shared.apply,
    "proposals": proposals.apply,
    "usage": usage.apply,
}


async def apply_batch(db: aiosqlite.Connection, records: Sequence[AuditRecord], position: int) -> int:
    """Apply the records after ``position`` in one transaction; return the new position."""
    fresh = [r for r in records if r.seq > position]
    if not fresh:
        return position
    try:
        await db.execute("BEGIN IMMEDIATE")
        try:
            for project in PROJECTIONS.values():
                await project(db, fresh)
            new_position = fresh[-1].seq
            await dbmod.set_position(db, new_position)
            failpoints.reached("projector.applied")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise DatabaseError(f"applying AUDIT {fresh[0].seq}..{fresh[-1].seq}: {exc}") from exc
    return new_position
