"""Verifying a live projection: rebuild it from the log to the same position and compare.

The rebuild always starts at sequence 1, never from a projection snapshot: a snapshot is
a copy of a live file, so comparing a rebuild from one with a live file would check the
live files against each other, not against the log. Both sides are at one position: the
live digest and its position are read in one transaction (``q.projections.digest``, or
:func:`compare_file`), and the rebuild stops at exactly that record.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext

from ledgerbus.bus.archive import Archive
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.rebuild import rebuild


@dataclass(frozen=True, slots=True)
class ProjectionCheck:
    """The outcome: equal, or which tables differ (when the live file is at hand)."""

    ok: bool
    position: int
    detail: str


async def compare_digest(
    js: JetStreamContext, position: int, live_digest: str, memory_list_cap: int | None = None,
    archive: Archive | None = None,
) -> ProjectionCheck:
    """Rebuild records ``1..position`` (those AUDIT no longer holds from ``archive``) into a
    scratch file and compare with ``live_digest``."""
    with tempfile.TemporaryDirectory(prefix="ledgerbus-verify-") as tmp:
        path = Path(tmp) / "rebuilt.db"
        reached = await rebuild(js, path, until_seq=position, memory_list_cap=memory_list_cap, archive=archive)
        db = await dbmod.open_db(path)
        try:
            rebuilt = await dbmod.digest(db)
        finally:
            await db.close()
    if reached != position:
        return ProjectionCheck(False, position, f"the log ends at seq {reached}, the projection is at {position}")
    if rebuilt != live_digest:
        return ProjectionCheck(False, position, f"tables differ from a rebuild at seq {position}")
    return ProjectionCheck(True, position, f"equal to a fresh rebuild at seq {position}")


async def compare_file(js: JetStreamContext, live_path: Path, archive: Archive | None = None) -> ProjectionCheck:
    """Like :func:`compare_digest` for a local database, naming the tables that differ."""
    live = await dbmod.open_reader(live_path)
    try:
        await live.execute("BEGIN")
        position, live_dump = await dbmod.position(live), await dbmod.dump(live)
        cap = await dbmod.memory_cap(live)
        await live.execute("COMMIT")
    finally:
        await live.close()
    with tempfile.TemporaryDirectory(prefix="ledgerbus-verify-") as tmp:
        path = Path(tmp) / "rebuilt.db"
        await rebuild(js, path, until_seq=position, memory_list_cap=cap, archive=archive)
        db = await dbmod.open_db(path)
        try:
            rebuilt_dump = await dbmod.dump(db)
        finally:
            await db.close()
    differ = [t for t in dbmod.TABLES if live_dump.get(t) != rebuilt_dump.get(t)]
    if differ:
        return ProjectionCheck(False, position, f"tables differ from a rebuild at seq {position}: {', '.join(differ)}")
    return ProjectionCheck(True, position, f"equal to a fresh rebuild at seq {position}")
