"""Records the live stream no longer holds, read from the archive for a projection: what a
projector that fell behind a purge, a replay from seq 1 and ``audit verify``'s rebuild
apply before the stream's first record (docs/architecture.md, Retention and archives)."""

from __future__ import annotations

import asyncio
from datetime import datetime

import structlog
from nats.aio.msg import Msg

from ledgerbus.bus import codec
from ledgerbus.bus.archive import Archive, ArchiveError
from ledgerbus.bus.jsmeta import ack_meta
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.apply import Applier
from ledgerbus.projections.errors import LogGapError

log = structlog.get_logger(__name__)

BATCH = 1024


async def fill(applier: Applier, archive: Archive | None, before: int, until_time: datetime | None = None
               ) -> tuple[int, bool]:
    """Apply the records after the applier's position and before seq ``before`` (the
    first the stream gave) from ``archive``, with ``until_time`` only those recorded at or
    before it; return the position reached and whether that time cut it short.
    :class:`LogGapError` names the range when no archive holds them."""
    first, last = applier.position + 1, before - 1
    if last < first:
        return applier.position, False
    if archive is None:
        raise LogGapError(f"AUDIT starts at seq {before} but this projection is at seq {first - 1}: records "
                          f"{first}..{last} left the stream and no archive is configured", first - 1, before)

    def read() -> list[AuditRecord]:
        return [codec.read_record(seq, data) for seq, data in archive.records(first, last)]

    try:
        records = await asyncio.to_thread(read)
    except ArchiveError as exc:
        raise LogGapError(f"this projection is at seq {first - 1}, AUDIT's next record is seq {before}: {exc}",
                          first - 1, before) from exc
    cut = False
    if until_time is not None:
        kept = [r for r in records if r.at <= until_time]
        cut, records = len(kept) < len(records), kept[:next((i for i, r in enumerate(records) if r.at > until_time),
                                                           len(records))]
    for i in range(0, len(records), BATCH):
        await applier.submit(records[i:i + BATCH])
    log.info("archive_applied", first_seq=first, last_seq=records[-1].seq if records else first - 1,
             archive=str(archive.path))
    return applier.position, cut


async def submit(applier: Applier, msgs: list[Msg], archive: Archive | None,
                 until_time: datetime | None = None) -> bool:
    """Hand AUDIT messages to ``applier`` as :func:`projector.submit_msgs` does, first
    applying from ``archive`` whatever the stream skipped before each (records purged
    while it was read); return whether ``until_time`` cut the archived part short."""
    from ledgerbus.projections.projector import submit_msgs  # the projector imports this module

    run: list[Msg] = []
    last = 0  # the sequence of run[-1]
    for msg in msgs:
        seq = ack_meta(msg).stream_seq
        expected = (last if run else applier.position) + 1
        last = seq
        if seq > expected:
            if run:
                await submit_msgs(applier, run)
                run = []
            _, cut = await fill(applier, archive, seq, until_time)
            if cut:
                return True
        run.append(msg)
    if run:
        await submit_msgs(applier, run)
    return False
