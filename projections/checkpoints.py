"""The ``checkpoints`` projection: each agent's memory checkpoints, and their restores.

The memory a checkpoint names is copied by the memory projection (``snap_*`` tables);
this table is the catalogue: label, log position, who saved it, the agent's own state
blob, and how often it was restored.
"""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus import codec
from ledgerbus.bus.events import CheckpointRestored, CheckpointSaved
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso
from ledgerbus.projections.rows import reads

COLUMNS = ("agent", "checkpoint_id", "label", "seq", "at", "saved_by", "state", "restores", "last_restored_seq")


_KINDS = frozenset((CheckpointSaved, CheckpointRestored))


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Fold a batch: a save adds a row, a restore counts on it."""
    mine = [r for r in records if r.verdict == "accepted" and type(r.event) in _KINDS]
    if not mine:
        return
    rows = batch.rows("checkpoints", ("agent", "checkpoint_id"), COLUMNS)
    await rows.load(batch.fetch, reads(((r.event.agent, r.event.checkpoint_id), type(r.event) is CheckpointSaved)  # type: ignore[union-attr]
                                       for r in mine))
    for record in mine:
        match record.event:
            case CheckpointSaved() as e:
                rows.put({
                    "agent": e.agent, "checkpoint_id": e.checkpoint_id, "label": e.label, "seq": record.seq,
                    "at": iso(record.at), "saved_by": record.principal,
                    "state": None if e.state is None else codec.encode(e.state).decode(),
                    "restores": 0, "last_restored_seq": None,
                })
            case CheckpointRestored(agent=agent, checkpoint_id=cid):
                row = rows.get((agent, cid))
                if row is not None:
                    rows.update((agent, cid), restores=row["restores"] + 1, last_restored_seq=record.seq)
            case _:
                pass
    rows.store(batch.plan)
