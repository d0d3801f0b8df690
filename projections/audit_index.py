"""The ``audit_index`` projection: one row per audit record, accepted or rejected.

It answers "what happened to this task / agent / message, and who did it" without
reading the log: by ``key`` (task id, agent name, namespace), by ``principal``, and by
``msg_id`` (which is how a writer learns its write's verdict).

It holds what the live log holds: an ``audit_archived`` record deletes the rows of the
records it moved to the archive (``seq`` up to its ``through_seq``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus.compaction import archived_through
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso

SQL_INSERT = ("INSERT INTO audit_index (seq, at, verdict, code, principal, kind, key, msg_id, reason)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
SQL_ARCHIVED = "DELETE FROM audit_index WHERE seq <= ?"


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Insert one row per record; an archive deletes the rows of the records it archived."""
    start = 0
    if batch.archived:  # rare: most batches hold no archive
        for i, r in enumerate(records):
            if r.seq in batch.archived and (through := archived_through(r)) is not None:
                batch.plan.add_many(SQL_INSERT, [_row(x) for x in records[start : i + 1]])
                batch.plan.add(SQL_ARCHIVED, (through,))
                start = i + 1
    batch.plan.add_many(SQL_INSERT, [(r.seq, iso(r.at), r.verdict, r.code, r.principal, r.kind, r.key, r.msg_id,
                                      r.reason) for r in (records[start:] if start else records)])


def _row(r: AuditRecord) -> tuple[object, ...]:
    return (r.seq, iso(r.at), r.verdict, r.code, r.principal, r.kind, r.key, r.msg_id, r.reason)
