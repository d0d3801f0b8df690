"""The projection database: schema, opening, the tracking row, and a canonical dump.

Every projection's rows and the tracking row (the last applied AUDIT sequence) are
written in one transaction per batch, so after any crash the database is exactly the
projection of records ``1..position`` and the projector resumes at ``position + 1``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from projections.errors import DatabaseError, SchemaMismatch

SCHEMA = """
CREATE TABLE IF NOT EXISTS tracking (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id       TEXT PRIMARY KEY,
    skill         TEXT NOT NULL,
    input         TEXT NOT NULL,
    timeout_s     REAL NOT NULL,
    status        TEXT NOT NULL,
    submitted_by  TEXT NOT NULL,
    submitted_at  TEXT NOT NULL,
    submitted_seq INTEGER NOT NULL,
    agent         TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    started_at    TEXT,
    finished_at   TEXT,
    progress      TEXT,
    fraction      REAL,
    output        TEXT,
    error         TEXT,
    trace_id      TEXT NOT NULL DEFAULT '',
    tokens        INTEGER NOT NULL DEFAULT 0,
    cost_usd      REAL NOT NULL DEFAULT 0,
    updated_seq   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, submitted_seq);
CREATE INDEX IF NOT EXISTS tasks_by_seq ON tasks (submitted_seq);
CREATE TABLE IF NOT EXISTS agents (
    name            TEXT PRIMARY KEY,
    instance        TEXT NOT NULL,
    skills          TEXT NOT NULL,
    concurrency     INTEGER NOT NULL,
    status          TEXT NOT NULL,
    joined_at       TEXT NOT NULL,
    left_at         TEXT,
    tasks_completed INTEGER NOT NULL DEFAULT 0,
    tasks_failed    INTEGER NOT NULL DEFAULT 0,
    updated_seq     INTEGER NOT NULL
);
"""

TRACKING_NAME = "audit"

SCHEMA_VERSION = 2
"""Bumped whenever SCHEMA changes; an older file is rebuilt from the log, not migrated."""

# The tables a rebuild must reproduce exactly, with the key that orders a canonical dump.
TABLES = {"tracking": "name", "tasks": "task_id", "agents": "name"}


async def open_db(path: Path) -> aiosqlite.Connection:
    """Open (creating if needed) a projection database with its schema.

    Raises :class:`SchemaMismatch` for a file made by another schema version.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        async with db.execute("PRAGMA user_version") as cur:
            version = (await cur.fetchone())[0]  # type: ignore[index]
        async with db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tracking'") as cur:
            populated = (await cur.fetchone())[0]  # type: ignore[index]
        if populated and version != SCHEMA_VERSION:
            await db.close()
            raise SchemaMismatch(f"{path} has projection schema v{version}; this is v{SCHEMA_VERSION}")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except (sqlite3.Error, OSError) as exc:
        raise DatabaseError(f"cannot open projection database {path}: {exc}") from exc
    return db


async def position(db: aiosqlite.Connection) -> int:
    """The last AUDIT sequence applied to this database (0 for a new one)."""
    async with db.execute("SELECT position FROM tracking WHERE name = ?", (TRACKING_NAME,)) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def set_position(db: aiosqlite.Connection, seq: int) -> None:
    """Write the tracking row (inside the caller's transaction)."""
    await db.execute(
        "INSERT INTO tracking (name, position) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        (TRACKING_NAME, seq),
    )


async def digest(db: aiosqlite.Connection) -> str:
    """sha256 of the canonical dump: equal digests mean equal projection tables."""
    canonical = json.dumps(await dump(db), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def dump(db: aiosqlite.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection table's rows in key order: equal dumps mean equal databases."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, key in TABLES.items():
        async with db.execute(f"SELECT * FROM {table} ORDER BY {key}") as cur:
            out[table] = [tuple(row) for row in await cur.fetchall()]
    return out
