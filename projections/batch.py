"""What projections fold a batch with: the plan they add statements to, and the state
kept between batches (cached rows, and how to read the committed file).

The projector's :class:`~projections.apply.Applier` keeps one :class:`State` for as long
as it runs and hands the plans to the writer process while it folds the next batch;
:func:`~projections.apply.apply_batch` makes a fresh one for each batch and executes
the plan itself. The projections cannot tell the difference, which is what lets the
property tests speak for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ledgerbus.projections.rows import Fetch, Plan, Rows

CACHE_LIMIT = 50_000
"""Rows per table kept between batches (see :meth:`Rows.trim`)."""


class State:
    """Cached rows per table, the checkpoints saved in batches not yet committed, and the
    committed file to read the rest from.

    Everything a batch still in flight wrote is in here (its rows in the caches, its
    checkpoints in :attr:`saved`), so a read of the file never has to wait for the writer.
    """

    def __init__(self, fetch: Fetch, memory_cap: int, cache_limit: int = CACHE_LIMIT) -> None:
        self.fetch = fetch
        self.memory_cap = memory_cap
        self.cache_limit = cache_limit
        self._tables: dict[str, Rows] = {}
        self.saved: dict[tuple[str, str], tuple[int, tuple[Any, ...]]] = {}
        """(agent, checkpoint id) → (the position of the plan that saves it, the memory row it saves)"""
        self.archived_through: int | None = None
        """The last archive's cut as folded (``None``: read the file's ``archives`` row). Any
        lower value would only make the next archive look at more trees than it must."""

    def rows(self, table: str, key: Sequence[str], columns: Sequence[str]) -> Rows:
        """The cached rows of ``table`` (made on first use)."""
        rows = self._tables.get(table)
        if rows is None:
            rows = self._tables[table] = Rows(table, key, columns)
        return rows

    def trim(self, uncommitted: int, committed: int) -> None:
        """Bound the caches (call between batches), keeping the rows that the last
        ``uncommitted`` batches changed, and the checkpoints saved after ``committed``."""
        for rows in self._tables.values():
            rows.trim(self.cache_limit, uncommitted)
        if self.saved:
            self.saved = {k: v for k, v in self.saved.items() if v[0] > committed}

    def cached(self) -> int:
        """How many rows are cached, over all tables."""
        return sum(len(rows) for rows in self._tables.values())


class Batch:
    """One batch being folded: the state and the plan."""

    def __init__(self, state: State, plan: Plan) -> None:
        self.state = state
        self.plan = plan
        self.fetch = state.fetch
        self.archived: dict[int, list[str]] = {}
        """seq of each ``audit_archived`` record in the batch → the tasks it compacts out,
        in id order: decided by the tasks projection (which folds first), followed by the
        tables that refer to tasks (:mod:`projections.compaction`)."""

    def rows(self, table: str, key: Sequence[str], columns: Sequence[str]) -> Rows:
        return self.state.rows(table, key, columns)
