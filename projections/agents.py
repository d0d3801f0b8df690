"""The ``agents`` projection: who joined, with which skills, and what they have done.

An agent's live load (tasks it is running) is read from the tasks projection at query
time; its role is in its memory.
"""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus import codec
from ledgerbus.bus.events import AgentJoined, AgentLeft, TaskCompleted, TaskFailed
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso
from ledgerbus.projections.tasks import agent_name

COLUMNS = ("name", "instance", "skills", "concurrency", "status", "joined_at", "left_at", "joins",
           "tasks_completed", "tasks_failed", "updated_seq")

_KINDS = frozenset((AgentJoined, AgentLeft, TaskCompleted, TaskFailed))


def _name(record: AuditRecord) -> str:
    """The agent a record is about: its sender, or the one the router says left."""
    if isinstance(record.event, AgentLeft) and record.event.agent:
        return record.event.agent
    return agent_name(record.principal)


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Fold a batch of audit records into the agents table (rejected records change nothing)."""
    mine = [r for r in records if r.verdict == "accepted" and type(r.event) in _KINDS]
    if not mine:
        return
    rows = batch.rows("agents", ("name",), COLUMNS)
    await rows.load(batch.fetch, ((_name(r),) for r in mine))
    for record in mine:
        name = _name(record)
        row = rows.get((name,))
        match record.event:
            case AgentJoined() as e:
                rows.put({
                    "name": name, "instance": e.instance, "skills": codec.encode(e.skills).decode(),
                    "concurrency": e.concurrency, "status": "online", "joined_at": iso(record.at),
                    "left_at": None, "joins": (row["joins"] if row else 0) + 1,
                    "tasks_completed": row["tasks_completed"] if row else 0,
                    "tasks_failed": row["tasks_failed"] if row else 0, "updated_seq": record.seq,
                })
            case AgentLeft(instance=instance, remaining=remaining) as e if (
                    row is not None and row["instance"] == instance and remaining <= 0):
                # Several replicas may share a name: the agent is offline only when its
                # latest instance leaves; "lost" when the router saw its heartbeat lapse.
                status = "lost" if e.reason == "heartbeat_expired" else "offline"
                rows.update((name,), status=status, left_at=iso(record.at), updated_seq=record.seq)
            case TaskCompleted() if row is not None:
                rows.update((name,), tasks_completed=row["tasks_completed"] + 1, updated_seq=record.seq)
            case TaskFailed() if row is not None:
                rows.update((name,), tasks_failed=row["tasks_failed"] + 1, updated_seq=record.seq)
            case _:
                pass
    rows.store(batch.plan)
