"""Applying a batch of audit records: every projection plus the tracking row, one transaction.

Records at or below the tracking position are skipped, so re-delivering a batch (after
a crash, or to a replay) changes nothing. Each projection folds the whole batch into a
:class:`~projections.rows.Plan` (a handful of ``executemany`` runs, see
:mod:`projections.rows`), and the plan is executed in one transaction that ends with the
tracking row. Two ways to execute it:

- :func:`apply_batch` folds with a fresh state and executes the plan on the caller's
  connection, then returns: simple, and what the tests of each projection use;
- :class:`Applier` (the projector, ``agentctl replay``) keeps its caches between batches
  and hands each plan to a writer process (:mod:`projections.writer`), folding the next
  batch while SQLite writes the last: the two run on separate cores.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self

import aiosqlite

from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections import (
    agents,
    approvals,
    audit_index,
    checkpoints,
    compaction,
    forks,
    memory,
    proposals,
    shared,
    tasks,
    usage,
)
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.batch import CACHE_LIMIT, Batch, State
from ledgerbus.projections.errors import DatabaseError
from ledgerbus.projections.pipeline import Writer
from ledgerbus.projections.rows import REMEMBER, Fetch, Plan

DEPTH = 4
"""Plans in flight by default."""
MAX_DEPTH = REMEMBER
TAILS = 1024
"""Plans whose last record's hash the :class:`Applier` remembers (:attr:`Applier.tails`)."""

Projection = Callable[[Batch, Sequence[AuditRecord]], Awaitable[None]]

PROJECTIONS: dict[str, Projection] = {
    "tasks": tasks.apply,
    "agents": agents.apply,
    "approvals": approvals.apply,
    "audit_index": audit_index.apply,
    "memory": memory.apply,
    "checkpoints": checkpoints.apply,
    "shared": shared.apply,
    "proposals": proposals.apply,
    "usage": usage.apply,
    "forks": forks.apply,
    "archives": compaction.apply,
}
"""Every projection, in the order each folds a batch: ``tasks`` first, since it decides
which tasks an archive compacts out, which the others follow (:mod:`projections.compaction`)."""


async def fold(state: State, records: Sequence[AuditRecord], tail: int) -> Plan:
    """The plan that applies ``records`` (all after the tracking position) and moves the
    tracking row to ``tail``."""
    plan = Plan(tail)
    batch = Batch(state, plan)
    for project in PROJECTIONS.values():
        await project(batch, records)
    return plan


def fetcher(db: aiosqlite.Connection) -> Fetch:
    """Reads through ``db``."""

    async def fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with db.execute(sql, params) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    return fetch


async def apply_batch(db: aiosqlite.Connection, records: Sequence[AuditRecord], position: int) -> int:
    """Apply the records after ``position`` in one transaction on ``db``; return the new position."""
    fresh = [r for r in records if r.seq > position]
    if not fresh:
        return position
    state = State(fetcher(db), await dbmod.memory_cap(db) or dbmod.DEFAULT_MEMORY_LIST_CAP)
    plan = await fold(state, fresh, fresh[-1].seq)
    try:
        await db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in plan.steps:
                await db.executemany(sql, params)
            await dbmod.set_position(db, plan.position)
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise DatabaseError(f"applying AUDIT {fresh[0].seq}..{fresh[-1].seq}: {exc}") from exc
    return plan.position


class Applier:
    """Applies batches to the projection database at ``path`` through a writer process.

    :meth:`submit` folds a batch and hands its plan over; :meth:`drain` waits until
    everything handed over is committed. At most ``depth`` plans are in flight: folding
    batch *n* waits for *n − depth*, and the caches keep every row that the batches
    since then changed, so every other row in the file is as it will be. More than one
    in flight smooths out the two processes' uneven pace. ``position`` is the last
    record folded, ``committed`` the tracking row the file holds.
    """

    def __init__(self, path: Path, reader: aiosqlite.Connection, memory_cap: int, position: int,
                 cache_limit: int | None = None, depth: int = DEPTH) -> None:
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth {depth}: 1 to {MAX_DEPTH} plans may be in flight")
        self.depth = depth
        self.path = path
        self.reader = reader
        self.writer = Writer(path)
        self.position = position
        self.committed = position
        self.memory_cap = memory_cap
        self.cache_limit = CACHE_LIMIT if cache_limit is None else cache_limit
        self.tails: OrderedDict[int, str] = OrderedDict()
        """The hash of the last record of each of the last :data:`TAILS` plans, by its
        sequence: the positions the file can be at, and the record a snapshot taken there
        names (``projections/snapshots.py``)."""
        self._state: State | None = None

    @classmethod
    async def open(cls, path: Path, memory_cap: int | None = None, cache_limit: int | None = None,
                   depth: int = DEPTH) -> Applier:
        """Open (creating if needed) the database at ``path`` and start its writer."""
        db = await dbmod.open_db(path, memory_cap)
        try:
            cap = await dbmod.memory_cap(db) or dbmod.DEFAULT_MEMORY_LIST_CAP
            position = await dbmod.position(db)
        except BaseException:
            await db.close()
            raise
        applier = cls(path, db, cap, position, cache_limit, depth)
        try:
            await applier.writer.start()
        except BaseException:
            await db.close()
            raise
        return applier

    async def close(self) -> None:
        """Wait for the plans in flight, stop the writer, close the reader."""
        try:
            await self.writer.stop()
        finally:
            await self.reader.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is not None:
            await self.writer.kill()  # what was handed over may not be committed: never mind
        await self.close()

    async def submit(self, records: Sequence[AuditRecord]) -> None:
        """Fold the records after ``position`` and hand their plan to the writer."""
        fresh = [r for r in records if r.seq > self.position]
        if not fresh:
            return
        end = fresh[-1].seq
        while self.writer.in_flight >= self.depth:
            self.committed = await self.writer.acked()
        if self._state is None:
            self._state = State(fetcher(self.reader), self.memory_cap, self.cache_limit)
        state = self._state
        state.trim(self.writer.in_flight, self.committed)
        try:
            plan = await fold(state, fresh, end)
        except BaseException:
            self._state = None  # the caches hold half a batch: start afresh
            raise
        await self.writer.send(plan)
        self.position = end
        self.tails[end] = fresh[-1].hash
        if len(self.tails) > TAILS:
            self.tails.popitem(last=False)

    async def drain(self) -> int:
        """Wait until every plan handed over is committed; return the committed position."""
        while self.writer.in_flight:
            self.committed = await self.writer.acked()
        return self.committed
