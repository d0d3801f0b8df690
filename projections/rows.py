"""Batch writing: how a projection turns a batch of records into few SQL statements.

Two shapes, because projections have two kinds of rows:

- :class:`Rows` is for rows that events *change* (a task, an agent, an approval): the rows
  a batch touches are loaded in one query, every record of the batch is folded into them
  in memory, in log order, and each changed row is written once with ``executemany``.
  A task submitted, started and completed within one batch costs one row write.
- :class:`Ops` is for statements that must run in log order (appends, deletes, copies):
  it queues them, and consecutive runs of the same statement go to SQLite as one
  ``executemany``.

Either way the result is exactly what applying the records one by one would give.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

Row = dict[str, Any]

_CHUNK = 400  # keys per SELECT, well under SQLite's bound-parameter limit


class Rows:
    """The rows of one table a batch touches: loaded once, folded in memory, stored once."""

    def __init__(self, table: str, key: Sequence[str], columns: Sequence[str]) -> None:
        self.table = table
        self.key = tuple(key)
        self.columns = tuple(columns)
        self._rows: dict[tuple[Any, ...], Row | None] = {}
        self._dirty: set[tuple[Any, ...]] = set()

    async def load(self, db: aiosqlite.Connection, keys: Iterable[tuple[Any, ...]]) -> None:
        """Read the stored rows for ``keys`` (absent ones stay absent)."""
        wanted = [k for k in dict.fromkeys(keys) if k not in self._rows]
        for k in wanted:
            self._rows[k] = None
        cols = ", ".join(self.columns)
        width = len(self.key)
        for i in range(0, len(wanted), _CHUNK // width):
            chunk = wanted[i : i + _CHUNK // width]
            if width == 1:
                where = f"{self.key[0]} IN ({', '.join('?' * len(chunk))})"
            else:
                one = "(" + ", ".join("?" * width) + ")"
                where = f"({', '.join(self.key)}) IN (VALUES {', '.join([one] * len(chunk))})"
            args = [part for k in chunk for part in k]
            async with db.execute(f"SELECT {cols} FROM {self.table} WHERE {where}", args) as cur:
                for found in await cur.fetchall():
                    row = dict(zip(self.columns, found, strict=True))
                    self._rows[tuple(row[c] for c in self.key)] = row

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

    async def store(self, db: aiosqlite.Connection) -> None:
        """Write every changed row: one ``executemany`` for the upserts, one for deletes."""
        upserts = [self._rows[k] for k in self._dirty if self._rows[k] is not None]
        deletes = [k for k in self._dirty if self._rows[k] is None]
        if deletes:
            where = " AND ".join(f"{c} = ?" for c in self.key)
            await db.executemany(f"DELETE FROM {self.table} WHERE {where}", deletes)
        if upserts:
            marks = ", ".join("?" * len(self.columns))
            await db.executemany(
                f"INSERT OR REPLACE INTO {self.table} ({', '.join(self.columns)}) VALUES ({marks})",
                [tuple(row[c] for c in self.columns) for row in upserts if row is not None],
            )
        self._dirty.clear()

    async def flush(self, db: aiosqlite.Connection) -> None:
        """Store, then forget every cached row: for when a statement outside this cache is
        about to change the table (a wipe, a restore)."""
        await self.store(db)
        self._rows.clear()


class Ops:
    """SQL statements in log order; consecutive runs of one statement go as one executemany."""

    def __init__(self) -> None:
        self._runs: list[tuple[str, list[Sequence[Any]]]] = []

    def add(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Queue one statement."""
        if self._runs and self._runs[-1][0] == sql:
            self._runs[-1][1].append(params)
        else:
            self._runs.append((sql, [params]))

    async def flush(self, db: aiosqlite.Connection) -> None:
        """Run everything queued, in order."""
        runs, self._runs = self._runs, []
        for sql, params in runs:
            if len(params) == 1:
                await db.execute(sql, params[0])
            else:
                await db.executemany(sql, params)
