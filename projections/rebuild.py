"""Rebuilding projections from the log into a fresh database, from sequence 1."""

from __future__ import annotations

from pathlib import Path

from nats.js import JetStreamContext

from bus import subjects
from projections import db as dbmod
from projections.projector import apply_msgs, follow, next_batch


async def rebuild(js: JetStreamContext, path: Path, until_seq: int | None = None, batch: int = 1024) -> int:
    """Project AUDIT records ``1..until_seq`` (default: the current head) into ``path``.

    ``path`` must not exist yet: a rebuild never mixes with an old database. Returns the
    position reached.
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
                position = await apply_msgs(db, msgs, position)
        finally:
            await sub.unsubscribe()
    finally:
        await db.close()
    return position
