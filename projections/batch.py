"""What projections fold a batch with: the plan they add statements to, and the state
kept between batches (cached rows, and how to read the committed file).

The projector's :class:`~projections.apply.Applier` keeps one :class:`State` for as long
as it runs and hands the plans to the writer process while it folds the next batch;
:func:`~projections.apply.apply_batch` makes a fresh one for each batch and executes
the plan itself. The projections cannot tell the difference, which is what lets the
property tests speak for both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from projections.rows import Fetch, Plan, Rows

CACHE_LIMIT = 50_000
"""Rows per table kept between batches (see :meth:`Rows.trim`)."""


async def _settled() -> None:
    return None


class State:
    """Cached rows per table, and the committed file to read the rest from.

    ``settle`` waits until every plan handed over so far is committed: a read that must
    see what an earlier batch wrote in SQL (not through a cache) waits for it first.
    """

    def __init__(self, fetch: Fetch, memory_cap: int, settle: Callable[[], Awaitable[None]] = _settled,
                 cache_limit: int = CACHE_LIMIT) -> None:
        self.fetch = fetch
        self.settle = settle
        self.memory_cap = memory_cap
        self.cache_limit = cache_limit
        self._tables: dict[str, Rows] = {}

    def rows(self, table: str, key: Sequence[str], columns: Sequence[str]) -> Rows:
        """The cached rows of ``table`` (made on first use)."""
        rows = self._tables.get(table)
        if rows is None:
            rows = self._tables[table] = Rows(table, key, columns)
        return rows

    def trim(self, uncommitted: int) -> None:
        """Bound the caches (call between batches), keeping the rows that the last
        ``uncommitted`` batches changed."""
        for rows in self._tables.values():
            rows.trim(self.cache_limit, uncommitted)

    def cached(self) -> int:
        """How many rows are cached, over all tables."""
        return sum(len(rows) for rows in self._tables.values())


class Batch:
    """One batch being folded: the state, the plan, and what the batch itself saved."""

    def __init__(self, state: State, plan: Plan) -> None:
        self.state = state
        self.plan = plan
        self.fetch = state.fetch
        self.saved: dict[Any, Any] = {}
        """Checkpoints saved in this batch (not yet in the file): (agent, id) → memory row."""

    def rows(self, table: str, key: Sequence[str], columns: Sequence[str]) -> Rows:
        return self.state.rows(table, key, columns)
