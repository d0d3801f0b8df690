"""The ``audit_index`` projection: one row per audit record, accepted or rejected.

It answers "what happened to this task / agent / message, and who did it" without
reading the log: by ``key`` (task id, agent name, namespace), by ``principal``, and by
``msg_id`` (which is how a writer learns its write's verdict).
"""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus.events import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Insert one row per record."""
    batch.plan.add_many(
        "INSERT INTO audit_index (seq, at, verdict, code, principal, kind, key, msg_id, reason)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(r.seq, iso(r.at), r.verdict, r.code, r.principal, r.kind, r.key, r.msg_id, r.reason)
         for r in records],
    )
