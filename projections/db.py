"""The projection database: schema, opening, the tracking row, and a canonical dump.

Every projection's rows and the tracking row (the last applied AUDIT sequence) are
written in one transaction per batch, so after any crash the database is exactly the
projection of records ``1..position`` and the projector resumes at ``position + 1``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from ledgerbus.projections.errors import DatabaseError, SchemaMismatch
from ledgerbus.projections.writer import SQL_SET_POSITION, TRACKING_NAME

SCHEMA = """
CREATE TABLE IF NOT EXISTS tracking (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id        TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    skill          TEXT NOT NULL,
    input          TEXT NOT NULL,
    timeout_s      REAL NOT NULL,
    status         TEXT NOT NULL,
    submitted_by   TEXT NOT NULL,
    submitted_at   TEXT NOT NULL,
    submitted_seq  INTEGER NOT NULL,
    parent_task_id TEXT,
    agent          TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    started_at     TEXT,
    finished_at    TEXT,
    progress       TEXT,
    fraction       REAL,
    output         TEXT,
    error          TEXT,
    trace_id       TEXT NOT NULL DEFAULT '',
    tokens         INTEGER NOT NULL DEFAULT 0,
    cost_usd       REAL NOT NULL DEFAULT 0,
    step           TEXT,
    deps           TEXT,
    needs          TEXT,
    priority       INTEGER,
    dispatches     INTEGER NOT NULL DEFAULT 0,
    retry_at       TEXT,
    retryable      INTEGER NOT NULL DEFAULT 0,
    updated_seq    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, submitted_seq);
CREATE INDEX IF NOT EXISTS tasks_by_seq ON tasks (submitted_seq);
CREATE INDEX IF NOT EXISTS tasks_by_parent ON tasks (parent_task_id) WHERE parent_task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_by_agent ON tasks (agent, status);
CREATE TABLE IF NOT EXISTS agents (
    name            TEXT PRIMARY KEY,
    instance        TEXT NOT NULL,
    skills          TEXT NOT NULL,
    concurrency     INTEGER NOT NULL,
    status          TEXT NOT NULL,
    joined_at       TEXT NOT NULL,
    left_at         TEXT,
    joins           INTEGER NOT NULL DEFAULT 0,
    tasks_completed INTEGER NOT NULL DEFAULT 0,
    tasks_failed    INTEGER NOT NULL DEFAULT 0,
    updated_seq     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    task_id       TEXT PRIMARY KEY,
    skill         TEXT NOT NULL,
    submitted_by  TEXT NOT NULL,
    requested_at  TEXT NOT NULL,
    requested_seq INTEGER NOT NULL,
    status        TEXT NOT NULL,
    decided_by    TEXT,
    decided_at    TEXT,
    reason        TEXT,
    updated_seq   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (status, requested_seq);
CREATE TABLE IF NOT EXISTS usage (
    seq        INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    task_id    TEXT NOT NULL,
    agent      TEXT NOT NULL,
    provider   TEXT NOT NULL,
    model      TEXT NOT NULL,
    tokens_in  INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost_usd   REAL NOT NULL,
    latency_s  REAL NOT NULL,
    outcome    TEXT NOT NULL,
    call       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS usage_by_task ON usage (task_id, seq);
CREATE TABLE IF NOT EXISTS usage_archived (
    agent         TEXT NOT NULL,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    calls         INTEGER NOT NULL,
    failed        INTEGER NOT NULL,
    tokens_in     INTEGER NOT NULL,
    tokens_out    INTEGER NOT NULL,
    cost_usd      REAL NOT NULL,
    latency_s     REAL NOT NULL,
    max_latency_s REAL NOT NULL,
    PRIMARY KEY (agent, provider, model)
);
CREATE TABLE IF NOT EXISTS archives (
    name        TEXT PRIMARY KEY,
    through_seq INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    at          TEXT NOT NULL,
    rule        TEXT NOT NULL,
    tasks       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_index (
    seq       INTEGER PRIMARY KEY,
    at        TEXT NOT NULL,
    verdict   TEXT NOT NULL,
    code      TEXT NOT NULL,
    principal TEXT NOT NULL,
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    msg_id    TEXT NOT NULL,
    reason    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_key ON audit_index (key, seq);
CREATE INDEX IF NOT EXISTS audit_by_principal ON audit_index (principal, seq);
CREATE INDEX IF NOT EXISTS audit_by_msg_id ON audit_index (msg_id) WHERE msg_id != '';
CREATE TABLE IF NOT EXISTS memory (
    agent             TEXT PRIMARY KEY,
    role              TEXT,
    current_task      TEXT,
    observation_first INTEGER NOT NULL DEFAULT 0,
    observation_next  INTEGER NOT NULL DEFAULT 0,
    reasoning_first   INTEGER NOT NULL DEFAULT 0,
    reasoning_next    INTEGER NOT NULL DEFAULT 0,
    wiped_seq         INTEGER,
    restored_from     TEXT,
    updated_seq       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS knowledge (
    agent       TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    core        INTEGER NOT NULL,
    updated_seq INTEGER NOT NULL,
    PRIMARY KEY (agent, key)
);
CREATE TABLE IF NOT EXISTS memory_entries (
    agent     TEXT NOT NULL,
    section   TEXT NOT NULL,
    n         INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    at        TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    first_at  TEXT NOT NULL,
    rolled    INTEGER NOT NULL,
    value     TEXT,
    PRIMARY KEY (agent, section, n)
);
CREATE TABLE IF NOT EXISTS snap_memory (
    checkpoint_id     TEXT NOT NULL,
    agent             TEXT NOT NULL,
    role              TEXT,
    current_task      TEXT,
    observation_first INTEGER NOT NULL,
    observation_next  INTEGER NOT NULL,
    reasoning_first   INTEGER NOT NULL,
    reasoning_next    INTEGER NOT NULL,
    PRIMARY KEY (agent, checkpoint_id)
);
CREATE TABLE IF NOT EXISTS snap_knowledge (
    checkpoint_id TEXT NOT NULL,
    agent         TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    core          INTEGER NOT NULL,
    updated_seq   INTEGER NOT NULL,
    PRIMARY KEY (agent, checkpoint_id, key)
);
CREATE TABLE IF NOT EXISTS snap_entries (
    checkpoint_id TEXT NOT NULL,
    agent         TEXT NOT NULL,
    section       TEXT NOT NULL,
    n             INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    at            TEXT NOT NULL,
    first_seq     INTEGER NOT NULL,
    first_at      TEXT NOT NULL,
    rolled        INTEGER NOT NULL,
    value         TEXT,
    PRIMARY KEY (agent, checkpoint_id, section, n)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    agent             TEXT NOT NULL,
    checkpoint_id     TEXT NOT NULL,
    label             TEXT NOT NULL,
    seq               INTEGER NOT NULL,
    at                TEXT NOT NULL,
    saved_by          TEXT NOT NULL,
    state             TEXT,
    restores          INTEGER NOT NULL DEFAULT 0,
    last_restored_seq INTEGER,
    PRIMARY KEY (agent, checkpoint_id)
);
CREATE INDEX IF NOT EXISTS checkpoints_by_seq ON checkpoints (agent, seq);
CREATE TABLE IF NOT EXISTS shared (
    namespace   TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    written_by  TEXT NOT NULL,
    written_at  TEXT NOT NULL,
    expires_at  TEXT,
    updated_seq INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS shared_by_expiry ON shared (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS proposals (
    proposal_id   TEXT PRIMARY KEY,
    task_id       TEXT NOT NULL,
    capabilities  TEXT NOT NULL,
    name          TEXT NOT NULL,
    skills        TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    status        TEXT NOT NULL,
    profile       TEXT,
    proposed_at   TEXT NOT NULL,
    proposed_seq  INTEGER NOT NULL,
    approved_by   TEXT,
    approved_at   TEXT,
    updated_seq   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS proposals_by_status ON proposals (status, proposed_seq);
CREATE INDEX IF NOT EXISTS proposals_by_task ON proposals (task_id);
CREATE TABLE IF NOT EXISTS forks (
    task_id        TEXT PRIMARY KEY,
    source_task_id TEXT NOT NULL,
    at_seq         INTEGER NOT NULL,
    recording      TEXT NOT NULL,
    live           INTEGER NOT NULL,
    kept           TEXT NOT NULL,
    restored       TEXT NOT NULL,
    forked_by      TEXT NOT NULL,
    forked_at      TEXT NOT NULL,
    seq            INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS forks_by_source ON forks (source_task_id);
"""


SCHEMA_VERSION = 8
"""Bumped whenever SCHEMA or what a fold writes changes; an older file is rebuilt from the
log, not migrated. (v5: a new attempt clears the last one's end and error; a cancel clears
a pending retry and closes a held approval. v6: ``tasks.kind`` tells plans from tasks of
the ``plan`` skill; ``usage`` holds every LLM call. v7: an ``audit_archived`` record
compacts settled task trees out (``tasks.retryable``, ``usage_archived``, ``archives``). v8:
``usage.call`` names the recorded LLM call; ``forks``; a fork's kept plan steps are
created completed.)"""

DEFAULT_MEMORY_LIST_CAP = 1000

# Every table a rebuild must reproduce exactly, with the columns that order a canonical dump.
TABLES = {
    "tracking": "name",
    "meta": "name",
    "tasks": "task_id",
    "agents": "name",
    "approvals": "task_id",
    "audit_index": "seq",
    "usage": "seq",
    "usage_archived": "agent, provider, model",
    "archives": "name",
    "memory": "agent",
    "knowledge": "agent, key",
    "memory_entries": "agent, section, n",
    "snap_memory": "agent, checkpoint_id",
    "snap_knowledge": "agent, checkpoint_id, key",
    "snap_entries": "agent, checkpoint_id, section, n",
    "checkpoints": "agent, checkpoint_id",
    "shared": "namespace, key",
    "proposals": "proposal_id",
    "forks": "task_id",
}


_encode_json = msgspec.json.Encoder().encode


@functools.lru_cache(maxsize=8192)
def iso(at: datetime) -> str:
    """A timestamp as fixed-width ISO text, so text order is time order in SQL: what
    ``at.isoformat(timespec="microseconds")`` gives, made from msgspec's RFC 3339 text
    (a twentieth of the time, and a rebuild formats every record's).

    Cached: every projection formats the same record's time."""
    if at.tzinfo is not UTC:  # RFC 3339 has no seconds in an offset; msgspec drops them
        return at.isoformat(timespec="microseconds")
    text = _encode_json(at)[1:-1].decode()
    if len(text) == 19 or text[19] != ".":
        text = f"{text[:19]}.000000{text[19:]}"
    return f"{text[:-1]}+00:00" if text[-1] == "Z" else text


async def open_db(path: Path, memory_list_cap: int | None = None) -> aiosqlite.Connection:
    """Open (creating if needed) a projection database with its schema.

    ``memory_list_cap`` is part of what the projection means (it decides which memory
    entries are rolled into summaries), so it is stored in the file: a new file takes it
    (default :data:`DEFAULT_MEMORY_LIST_CAP`), and opening a file made with another cap
    raises :class:`SchemaMismatch`, as does a file made by another schema version.
    ``None`` opens an existing file with whatever cap it has.
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
        stored = await memory_cap(db)
        if stored is None:
            await db.execute(
                "INSERT INTO meta (name, value) VALUES ('memory_list_cap', ?)",
                (str(memory_list_cap or DEFAULT_MEMORY_LIST_CAP),),
            )
        elif memory_list_cap is not None and stored != memory_list_cap:
            await db.close()
            raise SchemaMismatch(f"{path} was built with memory_list_cap={stored}; the settings say {memory_list_cap}")
    except (sqlite3.Error, OSError) as exc:
        raise DatabaseError(f"cannot open projection database {path}: {exc}") from exc
    return db


async def position(db: aiosqlite.Connection) -> int:
    """The last AUDIT sequence applied to this database (0 for a new one)."""
    async with db.execute("SELECT position FROM tracking WHERE name = ?", (TRACKING_NAME,)) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def open_reader(path: Path) -> aiosqlite.Connection:
    """Open an existing projection database read-only.

    The query service reads through its own connection: in WAL mode it sees only
    committed batches, never one the projector is half way through.
    """
    if not path.exists():
        raise DatabaseError(f"no projection database at {path}")
    try:
        db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        db.row_factory = aiosqlite.Row
        async with db.execute("PRAGMA user_version") as cur:
            version = (await cur.fetchone())[0]  # type: ignore[index]
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot open projection database {path}: {exc}") from exc
    if version != SCHEMA_VERSION:
        await db.close()
        raise SchemaMismatch(f"{path} has projection schema v{version}; this is v{SCHEMA_VERSION}")
    return db


async def memory_cap(db: aiosqlite.Connection) -> int | None:
    """The memory list cap this database was built with (``None`` before it has one)."""
    async with db.execute("SELECT value FROM meta WHERE name = 'memory_list_cap'") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else None


async def set_position(db: aiosqlite.Connection, seq: int) -> None:
    """Write the tracking row (inside the caller's transaction)."""
    await db.execute(SQL_SET_POSITION, (seq,))


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


async def row_counts(db: aiosqlite.Connection) -> dict[str, int]:
    """How many rows each projection table holds."""
    counts = {}
    for table in TABLES:
        async with db.execute(f"SELECT count(*) FROM {table}") as cur:
            counts[table] = (await cur.fetchone())[0]  # type: ignore[index]
    return counts
