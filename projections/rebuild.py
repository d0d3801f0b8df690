"""Rebuilding projections from the log into a fresh database, from sequence 1: the whole log,
or the log as it was at a sequence or a moment (time travel)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus import codec, subjects
from bus.errors import SchemaError
from projections import db as dbmod
from projections.projector import apply_msgs, follow, next_batch

Progress = Callable[[int, int], None]
"""Called with (records applied, records to apply) as the rebuild goes."""


def _before(msgs: list[Msg], until_time: datetime) -> tuple[list[Msg], bool]:
    """The messages recorded at or before ``until_time``, and whether the cut fell here."""
    for i, msg in enumerate(msgs):
        try:
            at = codec.decode_record(msg.data).at
        except SchemaError:
            continue  # skipped by the projection anyway
        if at > until_time:
            return msgs[:i], True
    return msgs, False


async def rebuild(
    js: JetStreamContext,
    path: Path,
    until_seq: int | None = None,
    until_time: datetime | None = None,
    batch: int = 1024,
    on_progress: Progress | None = None,
) -> int:
    """Project AUDIT records ``1..until_seq`` (default: the current head), and with
    ``until_time`` only those the router recorded at or before it, into ``path``.

    ``path`` must not exist yet: a rebuild never mixes with an old database. Returns the
    position reached, which the database's tracking row also holds.
    """
    if path.exists():
        raise FileExistsError(f"{path} exists; a rebuild writes a new database")
    info = await js.stream_info(subjects.AUDIT_STREAM)
    last = info.state.last_seq if until_seq is None else min(until_seq, info.state.last_seq)
    db = await dbmod.open_db(path)
    position = 0
    try:
        if last == 0:
            return 0
        sub = await follow(js, 1)
        try:
            while position < last:
                msgs = [m for m in await next_batch(sub, batch, wait=10) if m.metadata.sequence.stream <= last]
                if not msgs:
                    break
                cut = False
                if until_time is not None:
                    msgs, cut = _before(msgs, until_time)
                if msgs:
                    position = await apply_msgs(db, msgs, position)
                if on_progress is not None:
                    on_progress(position, last)
                if cut:
                    break
        finally:
            await sub.unsubscribe()
    finally:
        await db.close()
    return position
