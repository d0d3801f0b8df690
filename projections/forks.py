"""The ``forks`` projection: one row per ``run_forked`` record, a new run of a task tree
from a log position (``agentctl fork``), so ``agentctl tasks show`` can draw the original
with its branches and a fork with where it comes from (docs/replay.md)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ledgerbus.bus.events import RunForked
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso

SQL_INSERT = ("INSERT OR REPLACE INTO forks (task_id, source_task_id, at_seq, recording, live, kept, restored,"
              " forked_by, forked_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_json = msgspec.json.Encoder().encode


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Insert a row per accepted ``run_forked`` record."""
    batch.plan.add_many(SQL_INSERT, [
        (e.task_id, e.source_task_id, e.at_seq, e.recording, int(e.live), _json(e.kept).decode(),
         _json(e.restored).decode(), r.principal, iso(r.at), r.seq)
        for r in records if type(e := r.event) is RunForked and r.verdict == "accepted"
    ])
