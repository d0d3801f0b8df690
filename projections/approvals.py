"""The ``approvals`` projection: every submission held for approval, and its decision."""

from __future__ import annotations

from collections.abc import Sequence

import aiosqlite

from bus.events import PLAN_SKILL, AuditRecord, PlanSubmitted, TaskApproved, TaskCancelled, TaskDenied, TaskSubmitted
from projections.db import iso
from projections.rows import Rows

COLUMNS = ("task_id", "skill", "submitted_by", "requested_at", "requested_seq", "status", "decided_by",
           "decided_at", "reason", "updated_seq")


async def apply(db: aiosqlite.Connection, records: Sequence[AuditRecord]) -> None:
    """Fold a batch: held submissions open a row, approvals and denials decide it.

    A held task cancelled before anyone decided is closed as ``cancelled``, so it leaves the
    queue people approve from.
    """
    mine = [
        r for r in records
        if r.accepted and (isinstance(r.event, TaskApproved | TaskDenied | TaskCancelled)
                           or (isinstance(r.event, TaskSubmitted | PlanSubmitted) and r.code == "approval_requested"))
    ]
    if not mine:
        return
    rows = Rows("approvals", ("task_id",), COLUMNS)
    await rows.load(db, ((r.event.task_id,) for r in mine if not isinstance(r.event, TaskSubmitted | PlanSubmitted)))  # type: ignore[union-attr]
    for record in mine:
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
    await rows.store(db)
