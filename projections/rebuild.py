"""Rebuilding projections from the log into a fresh database: from sequence 1, or from a
snapshot's position; the whole log, or the log as it was at a sequence or a moment (time
travel).

A snapshot is a compacted copy of a projection database (``VACUUM INTO``), tracking row
included, so a rebuild that starts from it applies only the records after it: a file
(``agentctl snapshot``, :func:`rebuild`'s ``from_snapshot``), or the newest one in the
``projections`` object store that checks (:func:`rebuild_from_store`,
``projections/snapshots.py``).
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.archive import Archive
from ledgerbus.bus.errors import UnreadableRecord
from ledgerbus.projections import archived
from ledgerbus.projections import db as dbmod
from ledgerbus.projections import snapshots
from ledgerbus.projections.apply import Applier
from ledgerbus.projections.errors import DatabaseError, LogGapError
from ledgerbus.projections.projector import follow, next_batch

Progress = Callable[[int, int], None]
"""Called with (records applied, records to apply) as the rebuild goes."""


def _before(msgs: list[Msg], until_time: datetime) -> tuple[list[Msg], bool]:
    """The messages recorded at or before ``until_time``, and whether the cut fell here
    (:class:`UnreadableRecord` for a record it cannot tell, before the cut)."""
    for i, msg in enumerate(msgs):
        if codec.read_record(msg.metadata.sequence.stream, msg.data).at > until_time:
            return msgs[:i], True
    return msgs, False


async def snapshot(source: Path, dest: Path) -> int:
    """Write a compacted, consistent copy of the projection database ``source`` to ``dest``
    (which must not exist) and return the position it holds.

    It reads through its own read-only connection, so a projector may go on writing.
    """
    if dest.exists():
        raise FileExistsError(f"{dest} exists; a snapshot writes a new file")
    db = await dbmod.open_reader(source)
    try:
        # VACUUM INTO copies one read transaction's view: tracking row and tables agree.
        await db.execute("VACUUM INTO ?", (str(dest),))
    except sqlite3.Error as exc:
        raise DatabaseError(f"snapshot of {source} into {dest}: {exc}") from exc
    finally:
        await db.close()
    copy = await dbmod.open_reader(dest)
    try:
        return await dbmod.position(copy)
    finally:
        await copy.close()


async def _start_from(path: Path, snapshot_path: Path, until_seq: int | None, until_time: datetime | None) -> int:
    """Copy the snapshot to ``path`` and return its position, refusing one past the target."""
    shutil.copyfile(snapshot_path, path)
    db = await dbmod.open_reader(path)
    try:
        position = await dbmod.position(db)
        async with db.execute("SELECT max(at) FROM audit_index") as cur:
            newest = (await cur.fetchone())[0]  # type: ignore[index]
    finally:
        await db.close()
    if until_seq is not None and until_seq < position:
        path.unlink()
        raise ValueError(f"the snapshot is at seq {position}, past --until-seq {until_seq}: rebuild from seq 1")
    if until_time is not None and newest is not None and datetime.fromisoformat(newest) > until_time:
        path.unlink()
        raise ValueError(f"the snapshot holds records up to {newest}, past --until: rebuild from seq 1")
    return position


async def rebuild(
    js: JetStreamContext,
    path: Path,
    until_seq: int | None = None,
    until_time: datetime | None = None,
    batch: int = 1024,
    on_progress: Progress | None = None,
    memory_list_cap: int | None = None,
    from_snapshot: Path | None = None,
    archive: Archive | None = None,
) -> int:
    """Project AUDIT records ``1..until_seq`` (default: the current head), and with
    ``until_time`` only those the router recorded at or before it, into ``path``.

    ``path`` must not exist yet: a rebuild never mixes with an old database. With
    ``from_snapshot`` it starts as a copy of that snapshot and applies only the records
    after the snapshot's position. Records AUDIT no longer holds are read from ``archive``
    (the retention rule's). Returns the position reached, which the database's tracking
    row also holds.

    A record this version cannot decode stops it with :class:`UnreadableRecord` (its
    sequence and likely cause), and records neither AUDIT nor the archive holds with
    :class:`LogGapError`; ``path`` is then removed: a rebuild that could not reach its
    target is not the projection asked for (``until_seq`` before that record is).
    """
    if path.exists():
        raise FileExistsError(f"{path} exists; a rebuild writes a new database")
    position = 0
    if from_snapshot is not None:
        position = await _start_from(path, from_snapshot, until_seq, until_time)
    return await _rebuild(js, path, position, until_seq, until_time, batch, on_progress,
                          memory_list_cap if from_snapshot is None else None, archive)


async def rebuild_from_store(
    js: JetStreamContext,
    path: Path,
    until_seq: int | None = None,
    until_time: datetime | None = None,
    batch: int = 1024,
    on_progress: Progress | None = None,
    memory_list_cap: int | None = None,
    archive: Archive | None = None,
) -> tuple[snapshots.Restored | None, int]:
    """:func:`rebuild`, starting from the newest snapshot in the ``projections`` object
    store that checks, was built with ``memory_list_cap`` and does not pass the target (at
    or before ``until_seq``, its newest record at or before ``until_time``); from sequence
    1 if there is none. Returns that snapshot (or ``None``) and the position reached."""
    if path.exists():
        raise FileExistsError(f"{path} exists; a rebuild writes a new database")
    restored = await snapshots.restore(js, path, memory_list_cap, until_seq, until_time)
    start = 0 if restored is None else restored.position
    reached = await _rebuild(js, path, start, until_seq, until_time, batch, on_progress,
                             memory_list_cap if restored is None else None, archive)
    return restored, reached


async def _rebuild(
    js: JetStreamContext,
    path: Path,
    position: int,
    until_seq: int | None,
    until_time: datetime | None,
    batch: int,
    on_progress: Progress | None,
    memory_list_cap: int | None,
    archive: Archive | None,
) -> int:
    """Apply the records after ``position`` (what the file at ``path``, if any, holds):
    those AUDIT no longer holds from ``archive``, then the stream's."""
    try:
        info = await js.stream_info(subjects.AUDIT_STREAM)
        last = info.state.last_seq if until_seq is None else min(until_seq, info.state.last_seq)
        async with await Applier.open(path, memory_list_cap) as applier:
            if last <= position:
                return position
            if position + 1 < info.state.first_seq:
                # Records the retention rule archived come first, from the archive.
                position, cut = await archived.fill(applier, archive, min(info.state.first_seq, last + 1), until_time)
                if on_progress is not None:
                    on_progress(position, last)
                if cut or position >= last:
                    return await applier.drain()
            sub = await follow(js, position + 1)
            try:
                while position < last:
                    msgs = [m for m in await next_batch(sub, batch, wait=10) if m.metadata.sequence.stream <= last]
                    if not msgs:
                        break
                    cut = False
                    if until_time is not None:
                        msgs, cut = _before(msgs, until_time)
                    if msgs:
                        # Records purged while this read went on are in the archive now.
                        cut = await archived.submit(applier, msgs, archive, until_time) or cut
                        position = applier.position
                    if on_progress is not None:
                        on_progress(position, last)
                    if cut:
                        break
            finally:
                await sub.unsubscribe()
            return await applier.drain()
    except (UnreadableRecord, LogGapError):
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        raise
