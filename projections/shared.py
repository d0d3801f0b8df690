"""The ``shared`` projection: context agents share, by namespace and key, with expiry.

A key written with ``ttl_s`` expires at the router's time of the write plus ``ttl_s``.
Reads never return an expired key; the rows themselves are deleted as the log's own
clock passes their expiry (the time of the newest record applied), so a rebuild
deletes exactly what the live projection deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from ledgerbus.bus import codec
from ledgerbus.bus.events import SharedWritten
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso
from ledgerbus.projections.rows import Rows

COLUMNS = ("namespace", "key", "value", "written_by", "written_at", "expires_at", "updated_seq")


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Fold a batch of writes, then drop the keys the batch's clock has passed."""
    mine = [r for r in records if r.verdict == "accepted" and type(r.event) is SharedWritten]
    if mine:
        rows = Rows("shared", ("namespace", "key"), COLUMNS)
        for record in mine:
            e = record.event
            assert isinstance(e, SharedWritten)
            if e.value is None:
                rows.delete((e.namespace, e.key))
                continue
            rows.put({
                "namespace": e.namespace, "key": e.key, "value": codec.encode(e.value).decode(),
                "written_by": record.principal, "written_at": iso(record.at),
                "expires_at": None if e.ttl_s is None else iso(record.at + timedelta(seconds=e.ttl_s)),
                "updated_seq": record.seq,
            })
        rows.store(batch.plan)
    if records:
        now = max(r.at for r in records)
        batch.plan.add("DELETE FROM shared WHERE expires_at IS NOT NULL AND expires_at <= ?", (iso(now),))
