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
from typing import Any

from ledgerbus.bus import codec
from ledgerbus.bus.events import (
    CheckpointRestored,
    CheckpointSaved,
    MemoryImage,
    MemoryWiped,
    MemoryWritten,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
)
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.rows import Plan, Row, Rows
from ledgerbus.projections.tasks import agent_name

COLUMNS = ("agent", "role", "current_task", "observation_first", "observation_next", "reasoning_first",
           "reasoning_next", "wiped_seq", "restored_from", "updated_seq")
SNAP_COLUMNS = ("role", "current_task", "observation_first", "observation_next", "reasoning_first", "reasoning_next")
LISTS = ("observation", "reasoning")

_MEMORY_EVENTS = frozenset((MemoryWritten, MemoryWiped, CheckpointSaved, CheckpointRestored))
_TASK_EVENTS = frozenset((TaskStarted, TaskCompleted, TaskFailed))

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
SQL_SNAP_MEMORY = (f"INSERT INTO snap_memory (checkpoint_id, agent, {', '.join(SNAP_COLUMNS)})"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
SQL_SNAP_KNOWLEDGE = (f"INSERT INTO snap_knowledge (checkpoint_id, agent, {_KNOWLEDGE_COLS})"
                      f" SELECT ?, agent, {_KNOWLEDGE_COLS} FROM knowledge WHERE agent = ?")
SQL_SNAP_ENTRIES = (f"INSERT INTO snap_entries (checkpoint_id, agent, {_ENTRY_COLS})"
                    f" SELECT ?, agent, {_ENTRY_COLS} FROM memory_entries WHERE agent = ?")
SQL_RESTORE_KNOWLEDGE = (f"INSERT INTO knowledge (agent, {_KNOWLEDGE_COLS}) SELECT agent, {_KNOWLEDGE_COLS}"
                         " FROM snap_knowledge WHERE agent = ? AND checkpoint_id = ?")
SQL_RESTORE_ENTRIES = (f"INSERT INTO memory_entries (agent, {_ENTRY_COLS}) SELECT agent, {_ENTRY_COLS}"
                       " FROM snap_entries WHERE agent = ? AND checkpoint_id = ?")


def new_row(agent: str, seq: int) -> Row:
    """The memory of an agent nothing has been written about yet."""
    return {"agent": agent, "role": None, "current_task": None, "observation_first": 0, "observation_next": 0,
            "reasoning_first": 0, "reasoning_next": 0, "wiped_seq": None, "restored_from": None, "updated_seq": seq}


def _owner(record: AuditRecord) -> str | None:
    """Whose memory the record changes, if anybody's."""
    kind = type(record.event)
    if record.verdict != "accepted":
        return None
    if kind in _MEMORY_EVENTS:
        return record.event.agent  # type: ignore[union-attr]
    if kind in _TASK_EVENTS and record.principal.startswith("agent-"):
        return agent_name(record.principal)
    return None


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Fold a batch into the memory tables, in log order."""
    mine = [(owner, r) for r in records if (owner := _owner(r)) is not None]
    if not mine:
        return
    cap = batch.state.memory_cap
    keep = cap // 2
    plan = batch.plan
    rows = batch.rows("memory", ("agent",), COLUMNS)
    await rows.load(batch.fetch, ((owner,) for owner, _ in mine))
    # Knowledge writes are folded per key (the last write of a batch wins); list appends
    # go to the plan in order. Knowledge is stored before a wipe, checkpoint or restore,
    # whose own statements follow, so each sees, and leaves, exactly the log's state.
    knowledge = Rows("knowledge", ("agent", "key"), KNOWLEDGE_COLUMNS)
    for agent, record in mine:
        row = rows.get((agent,)) or rows.put(new_row(agent, record.seq))
        seq = record.seq
        event = record.event
        kind = type(event)
        if kind is MemoryWritten:
            assert isinstance(event, MemoryWritten)
            section, key, value = event.section, event.key, event.value
            if section in LISTS:
                n = row[f"{section}_next"]
                at = dbmod.iso(record.at)
                plan.add(SQL_APPEND, (agent, section, n, seq, at, seq, at, codec.encode(value).decode()))
                first = row[f"{section}_first"]
                changes = {f"{section}_next": n + 1, "updated_seq": seq}
                if n + 1 - first > cap:
                    until = n - keep  # entries first..until become one summary at `until`
                    plan.add(SQL_ROLL, (until, agent, section, until))
                    plan.add(SQL_DROP_ROLLED, (agent, section, until))
                    changes[f"{section}_first"] = until
                rows.update((agent,), **changes)
            elif section == "knowledge" and isinstance(key, str):
                if value is None:
                    knowledge.delete((agent, key))
                else:
                    knowledge.put({"agent": agent, "key": key, "value": codec.encode(value).decode(),
                                   "core": int(event.core), "updated_seq": seq})
                rows.update((agent,), updated_seq=seq)
            elif section == "role":
                rows.update((agent,), role=None if value is None else codec.encode(value).decode(), updated_seq=seq)
        elif kind is TaskStarted:
            rows.update((agent,), current_task=event.task_id, updated_seq=seq)  # type: ignore[union-attr]
        elif kind is TaskCompleted or kind is TaskFailed:
            if row["current_task"] == event.task_id:  # type: ignore[union-attr]
                rows.update((agent,), current_task=None, updated_seq=seq)
        elif kind is MemoryWiped:
            knowledge.store(plan)
            plan.add("DELETE FROM knowledge WHERE agent = ? AND core = 0", (agent,))
            plan.add("DELETE FROM memory_entries WHERE agent = ?", (agent,))
            # Numbering goes on where it was, so an entry's n is never reused.
            rows.update((agent,), current_task=None, observation_first=row["observation_next"],
                        reasoning_first=row["reasoning_next"], wiped_seq=seq, updated_seq=seq)
        elif kind is CheckpointSaved:
            assert isinstance(event, CheckpointSaved)
            cid = event.checkpoint_id
            knowledge.store(plan)
            if event.memory is not None:  # a given memory (a fork's), not the agent's current one
                snap = _save_image(plan, agent, cid, event.memory, seq, dbmod.iso(record.at))
            else:
                snap = tuple(row[c] for c in SNAP_COLUMNS)
                plan.add(SQL_SNAP_KNOWLEDGE, (cid, agent))
                plan.add(SQL_SNAP_ENTRIES, (cid, agent))
            plan.add(SQL_SNAP_MEMORY, (cid, agent, *snap))
            batch.state.saved[(agent, cid)] = (plan.position, snap)
        elif kind is CheckpointRestored:
            cid = event.checkpoint_id  # type: ignore[union-attr]
            saved = await _saved(batch, agent, cid)
            if saved is None:
                continue  # the router refuses such a restore; a projection never guesses
            knowledge.store(plan)
            plan.add("DELETE FROM knowledge WHERE agent = ?", (agent,))
            plan.add("DELETE FROM memory_entries WHERE agent = ?", (agent,))
            plan.add(SQL_RESTORE_KNOWLEDGE, (agent, cid))
            plan.add(SQL_RESTORE_ENTRIES, (agent, cid))
            rows.update((agent,), **dict(zip(SNAP_COLUMNS, saved, strict=True)), restored_from=cid, updated_seq=seq)
    knowledge.store(plan)
    rows.store(plan)


def _save_image(plan: Plan, agent: str, cid: str, image: MemoryImage, seq: int, at: str) -> tuple[Any, ...]:
    """Write a given memory into checkpoint ``cid``'s tables; its ``snap_memory`` row's values."""
    plan.add_many(f"INSERT INTO snap_knowledge (checkpoint_id, agent, {_KNOWLEDGE_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                  [(cid, agent, key, codec.encode(entry.get("value")).decode(), int(bool(entry.get("core"))), seq)
                   for key, entry in image.knowledge.items()])
    plan.add_many(f"INSERT INTO snap_entries (checkpoint_id, agent, {_ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                  [(cid, agent, section, n, seq, at, seq, at, codec.encode(value).decode())
                   for section, values in (("observation", image.observation), ("reasoning", image.reasoning))
                   for n, value in enumerate(values)])
    role = None if image.role is None else codec.encode(image.role).decode()
    return (role, None, 0, len(image.observation), 0, len(image.reasoning))


async def _saved(batch: Batch, agent: str, cid: str) -> tuple[Any, ...] | None:
    """The memory row checkpoint ``cid`` saved: kept by the state while the batch that
    saved it may not be committed, else in the file."""
    if (agent, cid) in batch.state.saved:
        return batch.state.saved[(agent, cid)][1]
    found = await batch.fetch(
        f"SELECT {', '.join(SNAP_COLUMNS)} FROM snap_memory WHERE agent = ? AND checkpoint_id = ?", (agent, cid))
    return tuple(found[0]) if found else None
