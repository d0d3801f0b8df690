"""The ``archives`` projection: where the last ``audit_archived`` record cut the log.

Bounded projections: an ``audit_archived`` record (docs/architecture.md, "Retention and
archives") moves AUDIT records ``1..through_seq`` to the archive, and every projection lets
go of what only those records kept alive, exactly as the router's state does
(:mod:`bus.compaction` decides which task trees):

- ``tasks`` deletes the settled trees (:mod:`projections.tasks`, which folds first and
  leaves the ids in :attr:`Batch.archived <projections.batch.Batch.archived>`);
- ``approvals`` and ``proposals`` delete those tasks' rows; ``usage`` folds theirs into
  ``usage_archived`` (totals survive), and ``audit_index`` deletes its rows up to
  ``through_seq``;
- this table keeps one row: the cut, the record that made it, its rule and how many tasks
  archives have compacted out in all, so a query for a task the projection no longer has
  can say it may be in the archive.

Agents' counters, memory, checkpoints and shared context stay: they are not per task, and
memory lists are bounded by their own cap.
"""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus.compaction import archived_through
from ledgerbus.bus.events import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso

NAME = "audit"
SQL_ARCHIVED = (
    "INSERT INTO archives (name, through_seq, seq, at, rule, tasks) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET through_seq = excluded.through_seq, seq = excluded.seq, at = excluded.at,"
    " rule = excluded.rule, tasks = tasks + excluded.tasks"
)


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Record each archive of the batch, in order."""
    if not batch.archived:
        return
    for r in records:
        if r.seq in batch.archived and (through := archived_through(r)) is not None:
            assert r.retention is not None
            batch.plan.add(SQL_ARCHIVED, (NAME, through, r.seq, iso(r.at), r.retention.rule,
                                          len(batch.archived[r.seq])))

