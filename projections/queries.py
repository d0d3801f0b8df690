"""Reads over the projection database, shared by the query service and ``agentctl --db``."""

from __future__ import annotations

import json
from typing import Any

import aiosqlite

_JSON_COLUMNS = {"input", "output", "skills"}


def _row(row: aiosqlite.Row) -> dict[str, Any]:
    return {k: (json.loads(row[k]) if k in _JSON_COLUMNS and row[k] is not None else row[k]) for k in row.keys()}  # noqa: SIM118 - Row iterates values


async def list_tasks(db: aiosqlite.Connection, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The most recent tasks first, optionally only those in ``status``."""
    sql = "SELECT * FROM tasks"
    args: tuple[Any, ...] = ()
    if status:
        sql += " WHERE status = ?"
        args = (status,)
    sql += " ORDER BY submitted_seq DESC LIMIT ?"
    async with db.execute(sql, (*args, max(1, min(limit, 10_000)))) as cur:
        return [_row(r) for r in await cur.fetchall()]


async def get_task(db: aiosqlite.Connection, task_id: str) -> dict[str, Any] | None:
    """One task, or ``None``."""
    async with db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)) as cur:
        row = await cur.fetchone()
    return _row(row) if row else None


async def list_agents(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    """Every agent that ever joined, by name."""
    async with db.execute("SELECT * FROM agents ORDER BY name") as cur:
        return [_row(r) for r in await cur.fetchall()]
