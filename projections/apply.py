"""Applying a batch of audit records: every projection plus the tracking row, one transaction.

Records at or below the tracking position are skipped, so re-delivering a batch (after
a crash, or to a replay) changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence

import aiosqlite

from bus.events import AuditRecord
from projections import agents, tasks
from projections import db as dbmod
from projections.errors import DatabaseError

Handler = Callable[[aiosqlite.Connection, AuditRecord], Awaitable[None]]

HANDLERS: tuple[Handler, ...] = (tasks.apply, agents.apply)


async def apply_batch(db: aiosqlite.Connection, records: Sequence[AuditRecord], position: int) -> int:
    """Apply the records after ``position`` in one transaction; return the new position."""
    fresh = [r for r in records if r.seq > position]
    if not fresh:
        return position
    try:
        await db.execute("BEGIN IMMEDIATE")
        try:
            for record in fresh:
                for handler in HANDLERS:
                    await handler(db, record)
            new_position = fresh[-1].seq
            await dbmod.set_position(db, new_position)
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise DatabaseError(f"applying AUDIT {fresh[0].seq}..{fresh[-1].seq}: {exc}") from exc
    return new_position
