"""The ``memory`` projection: each agent's role, knowledge, observations, reasoning
history and current task, with wipes, checkpoints and restores.

Tables: ``memory`` (one row per agent: role, current task, and where its two lists
start and end), ``knowledge`` (key → value, ``core`` keys survive a wipe),
``memory_entries`` (the ``observation`` and ``reasoning`` lists, numbered ``n`` from 0
per list) and the ``snap_*`` tables (a copy of those three for each checkpoint).

Bounded growth: a list longer than the cap keeps its newest ``cap // 2`` entries and
rolls everything older into one summary entry (``rolled`` = how many entries it stands
for, ``first_seq``/``first_at`` .. ``seq``/``at`` = the span they covered). The cap is
stored in the database (see :func:`projections.db.open_db`), so every rebuild rolls at
the same places.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiosqlite

from bus import codec
from bus.events import (
    AuditRecord,
    CheckpointRestored,
    CheckpointSaved,
    MemoryWiped,
    MemoryWritten,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
)
from projections import db as dbmod
from projections.rows import Ops, Row, Rows
from projections.tasks import agent_name

COLUMNS = ("agent", "role", "current_task", "observation_first", "observation_next", "reasoning_first",
           "reasoning_next", "wiped_seq", "restored_from", "updated_seq")
SNAP_COLUMNS = ("role", "current_task", "observation_first", "observation_next", "reasoning_first", "reasoning_next")
LISTS = ("observation", "reasoning")

_MEMORY_EVENTS = (MemoryWritten, MemoryWiped, CheckpointSaved, CheckpointRestored)
_TASK_EVENTS = (TaskStarted, TaskCompleted, TaskFailed)

_ENTRY_COLS = "section, n, seq, at, first_seq, first_at, rolled, value"
_KNOWLEDGE_COLS = "key, value, core, updated_seq"

SQL_APPEND = f"INSERT INTO memory_entries (agent, {_ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)"
SQL_ROLL = (
    # One summary at n = :until standing for every entry up to it, then drop the rest.
    f"INSERT OR REPLACE INTO memory_entries (agent, {_ENTRY_COLS})"
    " SELECT agent, section, ?, max(seq), max(at), min(first_seq), min(first_at),"
    " sum(CASE WHEN rolled = 0 THEN 1 ELSE rolled END), NULL"
    " FROM memory_entries WHERE agent = ? AND section = ? AND n <= ? GROUP BY agent, section"
)
SQL_DROP_ROLLED = "DELETE FROM memory_entries WHERE agent = ? AND section = ? AND n < ?"
KNOWLEDGE_COLUMNS = ("agent", "key", "value", "core", "updated_seq")


def new_row(agent: str, seq: int) -> Row:
    """The memory of an agent nothing has been written about yet."""
    return {"agent": agent, "role": None, "current_task": None, "observation_first": 0, "observation_next": 0,
            "reasoning_first": 0, "reasoning_next": 0, "wiped_seq": None, "restored_from": None, "updated_seq": seq}


def _owner(record: AuditRecord) -> str | None:
    """Whose memory the record changes, if anybody's."""
    if not record.accepted:
        return None
    if isinstance(record.event, _MEMORY_EVENTS):
        return record.event.agent
    if isinstance(record.event, _TASK_EVENTS) and record.principal.startswith("agent-"):
        return agent_name(record.principal)
    return None


async def apply(db: aiosqlite.Connection, records: Sequence[AuditRecord]) -> None:
    """Fold a batch into the memory tables, in log order."""
    mine = [(owner, r) for r in records if (owner := _owner(r)) is not None]
    if not mine:
        return
    cap = await dbmod.memory_cap(db) or dbmod.DEFAULT_MEMORY_LIST_CAP
    keep = cap // 2
    rows = Rows("memory", ("agent",), COLUMNS)
    await rows.load(db, ((owner,) for owner, _ in mine))
    # Knowledge writes are folded per key (the last write of a batch wins); list appends
    # queue in order. Both are flushed before a wipe, checkpoint or restore, whose own
    # statements run at once, so each sees, and leaves, exactly the log's state.
    knowledge = Rows("knowledge", ("agent", "key"), KNOWLEDGE_COLUMNS)
    ops = Ops()

    async def barrier() -> None:
        await knowledge.flush(db)
        await ops.flush(db)

    for agent, record in mine:
        row = rows.get((agent,)) or rows.put(new_row(agent, record.seq))
        seq = record.seq
        match record.event:
            case TaskStarted(task_id=task_id):
                rows.update((agent,), current_task=task_id, updated_seq=seq)
            case TaskCompleted(task_id=task_id) | TaskFailed(task_id=task_id):
                if row["current_task"] == task_id:
                    rows.update((agent,), current_task=None, updated_seq=seq)
            case MemoryWritten(section="role", value=value):
                rows.update((agent,), role=None if value is None else codec.encode(value).decode(), updated_seq=seq)
            case MemoryWritten(section="knowledge", key=str(key), value=None):
                knowledge.delete((agent, key))
                rows.update((agent,), updated_seq=seq)
            case MemoryWritten(section="knowledge", key=str(key), value=value, core=core):
                knowledge.put({"agent": agent, "key": key, "value": codec.encode(value).decode(), "core": int(core),
                               "updated_seq": seq})
                rows.update((agent,), updated_seq=seq)
            case MemoryWritten(section=section, value=value) if section in LISTS:
                n = row[f"{section}_next"]
                at = dbmod.iso(record.at)
                ops.add(SQL_APPEND, (agent, section, n, seq, at, seq, at, codec.encode(value).decode()))
                first = row[f"{section}_first"]
                changes = {f"{section}_next": n + 1, "updated_seq": seq}
                if n + 1 - first > cap:
                    until = n - keep  # entries first..until become one summary at `until`
                    ops.add(SQL_ROLL, (until, agent, section, until))
                    ops.add(SQL_DROP_ROLLED, (agent, section, until))
                    changes[f"{section}_first"] = until
                rows.update((agent,), **changes)
            case MemoryWiped():
                await barrier()
                ops.add("DELETE FROM knowledge WHERE agent = ? AND core = 0", (agent,))
                ops.add("DELETE FROM memory_entries WHERE agent = ?", (agent,))
                await ops.flush(db)
                # Numbering goes on where it was, so an entry's n is never reused.
                rows.update((agent,), current_task=None, observation_first=row["observation_next"],
                            reasoning_first=row["reasoning_next"], wiped_seq=seq, updated_seq=seq)
            case CheckpointSaved(checkpoint_id=cid):
                await barrier()
                ops.add(
                    f"INSERT INTO snap_memory (checkpoint_id, agent, {', '.join(SNAP_COLUMNS)})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, agent, *(row[c] for c in SNAP_COLUMNS)),
                )
                ops.add(f"INSERT INTO snap_knowledge (checkpoint_id, agent, {_KNOWLEDGE_COLS})"
                        f" SELECT ?, agent, {_KNOWLEDGE_COLS} FROM knowledge WHERE agent = ?", (cid, agent))
                ops.add(f"INSERT INTO snap_entries (checkpoint_id, agent, {_ENTRY_COLS})"
                        f" SELECT ?, agent, {_ENTRY_COLS} FROM memory_entries WHERE agent = ?", (cid, agent))
                await ops.flush(db)
            case CheckpointRestored(checkpoint_id=cid):
                await barrier()  # the snapshot may have been saved earlier in this batch
                async with db.execute(
                    f"SELECT {', '.join(SNAP_COLUMNS)} FROM snap_memory WHERE agent = ? AND checkpoint_id = ?",
                    (agent, cid),
                ) as cur:
                    snap = await cur.fetchone()
                if snap is None:
                    continue  # the router refuses such a restore; a projection never guesses
                ops.add("DELETE FROM knowledge WHERE agent = ?", (agent,))
                ops.add("DELETE FROM memory_entries WHERE agent = ?", (agent,))
                ops.add(f"INSERT INTO knowledge (agent, {_KNOWLEDGE_COLS}) SELECT agent, {_KNOWLEDGE_COLS}"
                        " FROM snap_knowledge WHERE agent = ? AND checkpoint_id = ?", (agent, cid))
                ops.add(f"INSERT INTO memory_entries (agent, {_ENTRY_COLS}) SELECT agent, {_ENTRY_COLS}"
                        " FROM snap_entries WHERE agent = ? AND checkpoint_id = ?", (agent, cid))
                await ops.flush(db)
                rows.update((agent,), **dict(zip(SNAP_COLUMNS, snap, strict=True)), restored_from=cid, updated_seq=seq)
            case _:
                pass
    await barrier()
    await rows.store(db)
