"""Batch writing: how a projection turns a batch of records into few SQL statements.

A projection does not write to SQLite as it folds: it adds statements to the batch's
:class:`Plan`, and the plan is executed afterwards in one transaction (in this process,
or by the writer process: see :mod:`projections.writer`). Two shapes of rows:

- :class:`Rows` is for rows that events *change* (a task, an agent, an approval): the rows
  a batch touches are loaded in one query, every record of the batch is folded into them
  in memory, in log order, and each changed row is written once with ``executemany``.
  A task submitted, started and completed within one batch costs one row write. The
  rows stay cached between batches (the projector is the only writer of its file), so
  a task that started in the last batch and ends in this one costs no read.
- Statements that must run in log order (appends, deletes, copies) go straight into the
  plan, where consecutive runs of the same statement become one ``executemany``.

Either way the result is exactly what applying the records one by one would give.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgspec

Row = dict[str, Any]
Fetch = Callable[[str, Sequence[Any]], Awaitable[list[tuple[Any, ...]]]]
"""Run a SELECT against the committed database and return its rows."""

_CHUNK = 400  # keys per SELECT, well under SQLite's bound-parameter limit
_json = msgspec.json.Encoder().encode
REMEMBER = 16
"""Stores whose changed keys a cache remembers: more plans than this may not be in flight."""


class Plan:
    """A batch's statements in log order; consecutive runs of one statement go as one
    ``executemany``. ``position`` is the tracking row the transaction ends with."""

    def __init__(self, position: int = 0) -> None:
        self.position = position
        self.steps: list[tuple[str, list[Sequence[Any]]]] = []

    def add(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Queue one statement."""
        if self.steps and self.steps[-1][0] == sql:
            self.steps[-1][1].append(params)
        else:
            self.steps.append((sql, [params]))

    def add_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Queue one statement for each of ``params``."""
        if not params:
            return
        if self.steps and self.steps[-1][0] == sql:
            self.steps[-1][1].extend(params)
        else:
            self.steps.append((sql, list(params)))


def reads(refs: Iterable[tuple[tuple[Any, ...], bool]]) -> list[tuple[Any, ...]]:
    """From ``(key, creates)`` pairs in log order, the keys a batch must load: those whose
    first record reads the row. A row the batch creates first is put whole, so whatever
    the file holds for it does not matter."""
    first: dict[tuple[Any, ...], bool] = {}
    for key, creates in refs:
        if key not in first:
            first[key] = not creates
    return [key for key, read in first.items() if read]


class Rows:
    """The rows of one table that batches touch: loaded once, folded in memory, written
    once per batch, and kept between batches up to a bound."""

    def __init__(self, table: str, key: Sequence[str], columns: Sequence[str]) -> None:
        self.table = table
        self.key = tuple(key)
        self.columns = tuple(columns)
        self._rows: dict[tuple[Any, ...], Row | None] = {}
        self._dirty: set[tuple[Any, ...]] = set()
        self._stored: deque[set[tuple[Any, ...]]] = deque(maxlen=REMEMBER)
        cols = ", ".join(self.columns)
        self._select = f"SELECT {cols} FROM {self.table} WHERE "
        self._upsert = (f"INSERT OR REPLACE INTO {self.table} ({cols})"
                        f" VALUES ({', '.join('?' * len(self.columns))})")
        self._delete = f"DELETE FROM {self.table} WHERE {' AND '.join(f'{c} = ?' for c in self.key)}"
        if len(self.key) == 1:  # one statement for any number of keys (an archive deletes many)
            self._delete_all = f"DELETE FROM {self.table} WHERE {self.key[0]} IN (SELECT value FROM json_each(?))"

    async def load(self, fetch: Fetch, keys: Iterable[tuple[Any, ...]]) -> None:
        """Read the stored rows for the ``keys`` not cached yet (absent ones stay absent)."""
        rows = self._rows
        wanted = [k for k in dict.fromkeys(keys) if k not in rows]
        if not wanted:
            return
        for k in wanted:
            rows[k] = None
        width = len(self.key)
        step = _CHUNK // width
        for i in range(0, len(wanted), step):
            chunk = wanted[i : i + step]
            if width == 1:
                where = f"{self.key[0]} IN ({', '.join('?' * len(chunk))})"
            else:
                one = "(" + ", ".join("?" * width) + ")"
                where = f"({', '.join(self.key)}) IN (VALUES {', '.join([one] * len(chunk))})"
            for found in await fetch(self._select + where, [part for k in chunk for part in k]):
                row = dict(zip(self.columns, found, strict=True))
                rows[tuple(row[c] for c in self.key)] = row

    async def select(self, fetch: Fetch, where: str, params: Sequence[Any], test: Callable[[Row], bool],
                     columns: Sequence[str]) -> dict[tuple[Any, ...], Row]:
        """The rows, as the batch has them now, that ``where`` (SQL, on the file) and
        ``test`` (the same condition, on a cached row) pick: key → the key and ``columns``.
        The cache holds every row that batches not yet committed, and this one so far,
        changed, so a cached row stands for the file's; the cache is scanned once."""
        cols = self._columns(columns)
        out = await self._uncached(fetch, where, params, cols)
        for key, row in self._rows.items():
            if row is not None and test(row):
                out[key] = {c: row[c] for c in cols}
        return out

    async def where_in(self, fetch: Fetch, column: str, values: Iterable[Any],
                       columns: Sequence[str]) -> dict[tuple[Any, ...], Row]:
        """As :meth:`select`, the rows whose ``column`` (best indexed) is one of ``values``
        (text or numbers: they go to SQLite as one JSON array, however many)."""
        members = set(values)
        if not members:
            return {}
        cols = self._columns(columns)
        out = await self._uncached(fetch, f"{column} IN (SELECT value FROM json_each(?))",
                                   (_json(sorted(members)).decode(),), cols)
        for key, row in self._rows.items():
            if row is not None and row[column] in members:
                out[key] = {c: row[c] for c in cols}
        return out

    def _columns(self, columns: Sequence[str]) -> list[str]:
        return [*self.key, *(c for c in columns if c not in self.key)]

    async def _uncached(self, fetch: Fetch, where: str, params: Sequence[Any],
                        cols: Sequence[str]) -> dict[tuple[Any, ...], Row]:
        """The file's rows that ``where`` picks, but for those the cache holds."""
        width = len(self.key)
        cached = self._rows
        out: dict[tuple[Any, ...], Row] = {}
        for found in await fetch(f"SELECT {', '.join(cols)} FROM {self.table} WHERE {where}", params):
            if (key := tuple(found[:width])) not in cached:
                out[key] = dict(zip(cols, found, strict=True))
        return out

    def get(self, key: tuple[Any, ...]) -> Row | None:
        """The row as the batch has it so far (``None``: absent or deleted)."""
        return self._rows.get(key)

    def put(self, row: Row) -> Row:
        """Insert or replace a whole row."""
        key = tuple(row[c] for c in self.key)
        self._rows[key] = row
        self._dirty.add(key)
        return row

    def update(self, key: tuple[Any, ...], **changes: Any) -> Row | None:
        """Change some columns of an existing row; an absent row stays absent."""
        row = self._rows.get(key)
        if row is not None:
            row.update(changes)
            self._dirty.add(key)
        return row

    def delete(self, key: tuple[Any, ...]) -> None:
        """Delete the row (if it exists)."""
        self._rows[key] = None
        self._dirty.add(key)

    def store(self, plan: Plan) -> None:
        """Add every changed row to ``plan``: one ``executemany`` for the deletes, one for
        the upserts."""
        rows = self._rows
        deletes = [k for k in self._dirty if rows[k] is None]
        if len(self.key) == 1 and deletes:
            plan.add(self._delete_all, (_json(sorted(k[0] for k in deletes)).decode(),))
        else:
            plan.add_many(self._delete, deletes)
        columns = self.columns
        plan.add_many(self._upsert, [tuple([row[c] for c in columns]) for k in self._dirty
                                     if (row := rows[k]) is not None])
        self._stored.append(self._dirty)
        self._dirty = set()

    def trim(self, limit: int, keep: int) -> None:
        """Past ``limit`` cached rows, keep only those the last ``keep`` stores changed.

        Those must stay: their batches may not be committed yet, so the file may not show
        them. Every other row is in the file as cached, and is read again if needed. (A
        key those stores changed that is gone already went at an earlier trim, when its
        batch was committed.)
        """
        if len(self._rows) > limit:
            rows = self._rows
            recent = list(self._stored)[max(0, len(self._stored) - keep) :]
            self._rows = {k: rows[k] for stored in recent for k in stored if k in rows}

    def __len__(self) -> int:
        return len(self._rows)
