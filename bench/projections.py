"""Projection rebuild rate vs SQLite's own ``executemany`` of the same rows.

A deterministic log of N mixed audit records (tasks through their lifecycle with
progress, usage and failures; agents joining; memory writes, wipes, checkpoints and
restores; shared context with expiry; approvals; rejections) is rebuilt into a fresh
database the way the projector does it: decode the stored bytes, apply in batches, one
transaction per batch. The baseline, in the same run, writes the rows that rebuild ended
with into a fresh file with the same schema and indexes, with plain ``sqlite3``
``executemany``, in as many transactions. rebuild/raw is the share of SQLite's own
insert rate a rebuild keeps.
"""

from __future__ import annotations

import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ledgerbus.bus import codec
from ledgerbus.bus.events import (
    AgentJoined,
    AnyEvent,
    CheckpointRestored,
    CheckpointSaved,
    MemoryWiped,
    MemoryWritten,
    SharedWritten,
    TaskApproved,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
)
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.apply import Applier

T0 = datetime(2026, 1, 1, tzinfo=UTC)
AGENTS = [f"worker-{i}" for i in range(10)]


def mixed_log(n: int) -> list[bytes]:
    """``n`` stored audit records (JSON bytes, as in the AUDIT stream), every kind mixed."""
    events: list[tuple[str, str, str, AnyEvent]] = []  # principal, code, key, event
    for name in AGENTS:
        events.append((f"agent-{name}", "ok", name, AgentJoined(id=f"j-{name}", instance=f"{name}-1", skills=["echo"])))
    i = 0
    while len(events) < n:
        i += 1
        agent = AGENTS[i % len(AGENTS)]
        who = f"agent-{agent}"
        task = f"t{i}"
        held = i % 50 == 0
        events.append(("cli-ops", "approval_requested" if held else "ok", task,
                       TaskSubmitted(id=f"s{i}", task_id=task, skill="echo", input={"i": i, "text": "hello"})))
        if held:
            events.append(("cli-boss", "ok", task, TaskApproved(id=f"a{i}", task_id=task)))
        events.append((who, "ok", task, TaskStarted(id=f"st{i}", task_id=task, attempt=1)))
        events.append((who, "ok", task, TaskProgress(id=f"p{i}", task_id=task, attempt=1, message="half", fraction=0.5)))
        events.append((who, "ok", task, TaskUsage(id=f"u{i}", task_id=task, attempt=1, tokens_in=100, tokens_out=20)))
        events.append((who, "ok", agent, MemoryWritten(id=f"o{i}", agent=agent, section="observation",
                                                       value={"task": task, "note": "it went fine"})))
        events.append((who, "ok", agent, MemoryWritten(id=f"k{i}", agent=agent, section="knowledge",
                                                       key=f"fact-{i % 40}", value=i, core=i % 7 == 0)))
        if i % 3 == 0:
            events.append((who, "ok", agent, MemoryWritten(id=f"r{i}", agent=agent, section="reasoning",
                                                           value="because the input said so")))
        if i % 5 == 0:
            events.append((who, "ok", "team", SharedWritten(id=f"sh{i}", namespace="team", key=f"k{i % 100}",
                                                            value={"v": i}, ttl_s=30 if i % 2 else None)))
        if i % 9 == 0:
            events.append((who, "not_claimant", task, TaskCompleted(id=f"x{i}", task_id=task, attempt=9)))
        if i % 500 == 0:
            events.append(("cli-ops", "ok", agent, CheckpointSaved(id=f"c{i}", agent=agent, checkpoint_id=f"c{i}")))
        if i % 1000 == 0:
            events.append(("cli-ops", "ok", agent, CheckpointRestored(id=f"cr{i}", agent=agent,
                                                                    checkpoint_id=f"c{i - 500}")))
        if i % 1500 == 0:
            events.append(("cli-ops", "ok", agent, MemoryWiped(id=f"w{i}", agent=agent)))
        if i % 10 == 0:
            events.append((who, "ok", task, TaskFailed(id=f"f{i}", task_id=task, attempt=1, error="boom")))
        else:
            events.append((who, "ok", task, TaskCompleted(id=f"d{i}", task_id=task, attempt=1, output={"i": i})))
    out = []
    for seq, (who, code, key, event) in enumerate(events[:n], start=1):
        accepted = code in ("ok", "approval_requested")
        out.append(codec.encode(AuditRecord(
            seq=seq, at=T0 + timedelta(milliseconds=10 * seq), verdict="accepted" if accepted else "rejected",
            code=code, reason="" if accepted else "not the claimant", principal=who, kind=event.__struct_config__.tag,  # type: ignore[arg-type]
            key=key, msg_id=event.id, ingress_seq=seq, delivery=1, event=event, hash="0" * 64, prev_hash="0" * 64,
        )))
    return out


async def rebuild_file(path: Path, log: list[bytes], batch: int) -> float:
    """Decode and apply ``log`` in batches into a new database, as ``agentctl replay`` does
    with what it reads (an :class:`Applier` and its writer process); return the seconds
    taken, from the first record decoded to the last batch committed."""
    async with await Applier.open(path) as applier:
        start = time.perf_counter()
        for i in range(0, len(log), batch):
            await applier.submit([codec.decode_record(data) for data in log[i : i + batch]])
        await applier.drain()
        elapsed = time.perf_counter() - start
    return elapsed


async def final_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = await dbmod.open_reader(path)
    try:
        return await dbmod.dump(db)
    finally:
        await db.close()


def raw_insert(path: Path, rows: dict[str, list[tuple[Any, ...]]], transactions: int) -> float:
    """Insert ``rows`` into a fresh database of the same schema with plain sqlite3
    ``executemany``, spread over ``transactions`` commits; return the seconds taken."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(dbmod.SCHEMA)
    chunks: list[list[tuple[str, list[tuple[Any, ...]]]]] = [[] for _ in range(transactions)]
    for table, content in rows.items():
        step = max(1, -(-len(content) // transactions))
        for t, i in enumerate(range(0, len(content), step)):
            chunks[t].append((table, content[i : i + step]))
    start = time.perf_counter()
    for chunk in chunks:
        conn.execute("BEGIN")
        for table, content in chunk:
            marks = ", ".join("?" * len(content[0]))
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", content)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


async def run(events: int, rounds: int, batch: int, say: Any = print) -> dict[str, Any]:
    """Median rebuild and raw rates over ``rounds``, alternating which runs first."""
    log = mixed_log(events)
    transactions = -(-len(log) // batch)
    ours, raw = [], []
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="ledgerbus-bench-") as tmp:
            rebuilt, baseline = Path(tmp) / "rebuilt.db", Path(tmp) / "raw.db"
            if r % 2:
                seconds_raw = raw_insert(baseline, await _rows_of(log, Path(tmp) / "rows.db", batch), transactions)
                seconds = await rebuild_file(rebuilt, log, batch)
            else:
                seconds = await rebuild_file(rebuilt, log, batch)
                seconds_raw = raw_insert(baseline, await final_rows(rebuilt), transactions)
            rows = sum(len(v) for v in (await final_rows(rebuilt)).values())
        ours.append(len(log) / seconds)
        raw.append(len(log) / seconds_raw)
        say(f"round {r + 1}/{rounds}: rebuild {ours[-1]:>9,.0f} events/s   raw executemany {raw[-1]:>9,.0f} events/s")
    return {
        "events": len(log),
        "batch": batch,
        "final_rows": rows,
        "rebuild_events_per_s": statistics.median(ours),
        "raw_events_per_s": statistics.median(raw),
        "rebuild_over_raw": statistics.median(ours) / statistics.median(raw),
        # The two measures of a round run back to back; on a machine whose speed drifts,
        # the median of those paired ratios is the steadier figure.
        "median_round_ratio": statistics.median(o / r for o, r in zip(ours, raw, strict=True)),
        "rounds_rebuild": ours,
        "rounds_raw": raw,
    }


async def _rows_of(log: list[bytes], path: Path, batch: int) -> dict[str, list[tuple[Any, ...]]]:
    await rebuild_file(path, log, batch)
    return await final_rows(path)
