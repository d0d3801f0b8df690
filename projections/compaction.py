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

from ledgerbus.bus import compaction
from ledgerbus.bus.compaction import archived_through
from ledgerbus.bus.lifecycle import Status
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso
from ledgerbus.projections.rows import Row, Rows

NAME = "audit"
_TREE = ("parent_task_id", "status", "retryable", "updated_seq")
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



async def settled_trees(batch: Batch, tasks: Rows, through: int) -> list[str]:
    """The tasks of every tree an archive at ``through`` lets go of, in id order: the trees
    of the tasks whose last record is after the previous archive's cut and at or before
    this one (:mod:`bus.compaction` says why no other tree can be), each read whole from
    the ``tasks`` rows as the batch has them, and let go of if every task is closed."""
    before = batch.state.archived_through
    if before is None:
        found = await batch.fetch("SELECT through_seq FROM archives WHERE name = ?", (NAME,))
        before = int(found[0][0]) if found else 0
    batch.state.archived_through = through
    held: dict[str, Row] = {key[0]: row for key, row in (await tasks.select(
        batch.fetch, "updated_seq > ? AND updated_seq <= ?", (before, through),
        lambda row: before < row["updated_seq"] <= through, _TREE)).items()}
    candidates = list(held)
    wanted = {p for row in held.values() if (p := row["parent_task_id"]) is not None and p not in held}
    while wanted:  # up to each root
        found_rows = await tasks.where_in(batch.fetch, "task_id", wanted, _TREE)
        held.update((key[0], row) for key, row in found_rows.items())
        wanted = {p for row in found_rows.values() if (p := row["parent_task_id"]) is not None and p not in held}
    trees = compaction.trees(candidates, lambda t: p if (p := held[t]["parent_task_id"]) in held else None,
                             lambda t: ())
    roots = [tree[0] for tree in trees]
    children: dict[str, list[str]] = {}
    level = roots
    while level:  # down through each tree
        found_rows = await tasks.where_in(batch.fetch, "parent_task_id", level, _TREE)
        level = []
        for key, row in found_rows.items():
            held[key[0]] = row
            children.setdefault(row["parent_task_id"], []).append(key[0])
            level.append(key[0])
    closed = compaction.closed
    gone: list[str] = []
    for tree in compaction.trees(roots, lambda t: None, lambda t: children.get(t, ())):
        if all(closed(Status((row := held[t])["status"]), bool(row["retryable"]), row["updated_seq"], through)
               for t in tree):
            gone += tree
    return sorted(gone)
