"""The audit writer: seals records into the hash chain and appends them to AUDIT.

Each record is published with ``Nats-Expected-Last-Sequence`` set to the sequence just
before it, so JetStream stores it only as the very next record: no gap can open. A batch
is pipelined (all publishes in flight, then all acks awaited), which keeps the chain strict
without one round trip per record.

A sequence alone does not bind a pipelined record to the one before it, though. If another
writer (a router that has just taken the lease from this one) stores a record at seq N
while this one's batch of N, N+1, N+2 is in flight, this one's N is refused and its N+1,
expecting "last sequence N", is stored after the other writer's N: the chain is broken
(seen in the chaos suite, with a stale leader's appends flushed by a reconnect). So every
record of a batch but the last carries its hash as ``Nats-Msg-Id``, and every record but
the first requires the stream's last record to be that one (``Nats-Expected-Last-Msg-Id``):
a record is stored only right after its own predecessor. The first record of a batch
needs no such link: it follows this writer's head, which is a record AUDIT acknowledged
(or the router read back from it), so whichever record takes its position (its own, or a
late one of a batch that timed out, or another writer's) follows the stored chain, and
what came after the loser of that race is refused with it. (JetStream keeps the last
message id only in memory and forgets it across a restart, so a batch's first record
could not require it.)
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from ledgerbus.bus import anchor, chain, subjects
from ledgerbus.bus.archive import Archive, ArchiveError
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.errors import ChainError, UnreadableRecord
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.records import AuditRecord
from ledgerbus.router.errors import AuditAppendError, ChainBrokenError, LogUnreadableError
from ledgerbus.router.state import RouterState

log = structlog.get_logger(__name__)


class AuditLog:
    """Appends sealed records after the current chain head."""

    def __init__(self, publisher: Publisher, head: ChainHead) -> None:
        self.publisher = publisher
        self.head = head

    def seal(self, record: AuditRecord) -> tuple[AuditRecord, bytes]:
        """Give ``record`` the next sequence and link it to the head (not yet stored)."""
        record = msgspec.structs.replace(record, seq=self.head.seq + 1)
        sealed, data = chain.seal(record, self.head.hash)
        self.head = ChainHead(sealed.seq, sealed.hash)
        return sealed, data

    async def append(self, batch: list[tuple[AuditRecord, bytes, dict[str, str]]]) -> None:
        """Store sealed records (with their headers) in order; raise if any is not the next.

        No span of its own: the append is part of the hop of the message it records
        (``router.process``, which ends after the acknowledgement), one span per hop.
        """
        messages = []
        last = len(batch) - 1
        for i, (record, data, headers) in enumerate(batch):
            hdrs = dict(headers)
            hdrs[subjects.HDR_EXPECTED_LAST_SEQ] = str(record.seq - 1)
            if i > 0:  # stored only right after its own predecessor (the module says why)
                hdrs[subjects.HDR_EXPECTED_LAST_MSG_ID] = record.prev_hash
            if i < last:
                hdrs[subjects.HDR_MSG_ID] = record.hash
            messages.append((subjects.audit(record.verdict, record.kind, record.key), data, hdrs))
        acks = await self.publisher.publish(messages)
        for (record, _, _), ack in zip(batch, acks, strict=True):
            if isinstance(ack, BaseException):
                raise AuditAppendError(f"audit seq {record.seq} not stored: {ack}") from ack
            if ack.seq != record.seq:
                raise AuditAppendError(f"audit record stored at seq {ack.seq}, expected {record.seq}")


async def recover(js: JetStreamContext, state: RouterState, watch: anchor.Watch | None = None,
                  start: ChainHead = ChainHead(), archive: Archive | None = None) -> ChainHead:
    """Fold the audit log after ``start`` (from the first record by default; a snapshot's
    head, with ``state`` loaded from it) into ``state`` and return the chain head, verifying
    the chain from ``start``; ``watch`` sees every record read (what the chain's anchor is
    compared with).

    Records before AUDIT's first sequence are read from ``archive`` (the retention rule's).
    A broken chain stops the router: extending it would make tampering look legitimate.
    So does a record it cannot decode (:class:`LogUnreadableError`, naming its sequence).
    """
    info = await js.stream_info(subjects.AUDIT_STREAM)
    last = info.state.last_seq
    if last <= start.seq:
        return start
    head = start
    if start.seq + 1 < info.state.first_seq:
        # Records that left the stream under the retention rule: read from the archive,
        # as one chain with the stream (with no snapshot past them, a start reads them all).
        head = await _fold_archived(archive, state, watch, head, info.state.first_seq - 1)
    sub = await js.subscribe(
        subjects.AUDIT_ALL,
        stream=subjects.AUDIT_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=head.seq + 1),
    )
    try:
        while head.seq < last:
            msg = await sub.next_msg(timeout=10)
            seq = msg.metadata.sequence.stream
            if seq > head.seq + 1:
                # Purged while this read began: those records are in the archive now.
                head = await _fold_archived(archive, state, watch, head, seq - 1)
            try:
                record, head = chain.verify_next(seq, msg.data, head)
            except ChainError as exc:
                raise ChainBrokenError(f"refusing to extend a broken audit chain: {exc}") from exc
            except UnreadableRecord as exc:
                # Folding around it would leave the state without what it decided (a
                # dispatch, a claim), and appending after it would extend a chain this
                # router cannot check.
                raise LogUnreadableError(f"refusing to serve: {exc}") from exc
            state.apply(record, (msg.headers or {}).get(subjects.HDR_TRACEPARENT, ""))
            if watch is not None:
                watch.record(record)
    except TimeoutError as exc:
        raise AuditAppendError(f"timed out reading the audit log at seq {head.seq} of {last}") from exc
    finally:
        await sub.unsubscribe()
    return head


async def _fold_archived(archive: Archive | None, state: RouterState, watch: anchor.Watch | None, head: ChainHead,
                         last: int) -> ChainHead:
    """Fold records ``head.seq + 1 .. last`` from the archive, verifying the chain."""
    if archive is None:
        raise LogUnreadableError(f"refusing to serve: records {head.seq + 1}..{last} left AUDIT and no archive "
                                 "is configured to read them from")
    try:
        records = await asyncio.to_thread(lambda: list(archive.records(head.seq + 1, last)))
    except ArchiveError as exc:
        raise LogUnreadableError(f"refusing to serve: {exc} (archive {archive.path})") from exc
    for seq, data in records:
        try:
            record, head = chain.verify_next(seq, data, head)
        except ChainError as exc:
            raise ChainBrokenError(f"refusing to extend a broken audit chain: {exc} (archive {archive.path})") from exc
        except UnreadableRecord as exc:
            raise LogUnreadableError(f"refusing to serve: {exc}") from exc
        state.apply(record)
        if watch is not None:
            watch.record(record)
    log.info("archive_folded", first_seq=records[0][0] if records else None, last_seq=last, archive=str(archive.path))
    return head
