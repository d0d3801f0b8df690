"""The ``approvals`` projection: every submission held for approval, and its decision."""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus.events import PLAN_SKILL, PlanSubmitted, TaskApproved, TaskCancelled, TaskDenied, TaskSubmitted
from ledgerbus.bus.lifecycle import APPROVAL_REQUESTED
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso
from ledgerbus.projections.rows import reads

COLUMNS = ("task_id", "skill", "submitted_by", "requested_at", "requested_seq", "status", "decided_by",
           "decided_at", "reason", "updated_seq")


_DECISIONS = frozenset((TaskApproved, TaskDenied, TaskCancelled))
_REQUESTS = frozenset((TaskSubmitted, PlanSubmitted))


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Fold a batch: held submissions open a row, approvals and denials decide it.

    A held task cancelled before anyone decided is closed as ``cancelled``, so it leaves the
    queue people approve from. An archive deletes the rows of the tasks it compacts out.
    """
    mine = [
        r for r in records
        if r.seq in batch.archived or (r.verdict == "accepted" and (
            type(r.event) in _DECISIONS or (r.code == APPROVAL_REQUESTED and type(r.event) in _REQUESTS)))
    ]
    if not mine:
        return
    rows = batch.rows("approvals", ("task_id",), COLUMNS)
    await rows.load(batch.fetch, reads(((r.event.task_id,), type(r.event) in _REQUESTS)  # type: ignore[union-attr]
                                       for r in mine if r.event is not None))
    for record in mine:
        if record.seq in batch.archived:
            for key in sorted(await rows.where_in(batch.fetch, "task_id", batch.archived[record.seq], ())):
                rows.delete(key)
            continue
        match record.event:
            case TaskSubmitted() | PlanSubmitted() as e:
                rows.put({
                    "task_id": e.task_id, "skill": e.skill if isinstance(e, TaskSubmitted) else PLAN_SKILL, "submitted_by": record.principal,
                    "requested_at": iso(record.at), "requested_seq": record.seq, "status": "pending",
                    "decided_by": None, "decided_at": None, "reason": None, "updated_seq": record.seq,
                })
            case TaskApproved(task_id=task_id, reason=reason) | TaskDenied(task_id=task_id, reason=reason):
                status = "approved" if isinstance(record.event, TaskApproved) else "denied"
                rows.update((task_id,), status=status, decided_by=record.principal,
                            decided_at=iso(record.at), reason=reason, updated_seq=record.seq)
            case TaskCancelled(task_id=task_id, reason=reason):
                row = rows.get((task_id,))
                if row is not None and row["status"] == "pending":
                    rows.update((task_id,), status="cancelled", decided_by=record.principal,
                                decided_at=iso(record.at), reason=reason or None, updated_seq=record.seq)
            case _:
                pass
    rows.store(batch.plan)
