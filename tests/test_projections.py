"""Projections on real SQLite: batch boundaries and redelivery never change the result."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bus.events import (
    AgentJoined,
    AuditRecord,
    Event,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskStarted,
    TaskSubmitted,
)
from projections import db as dbmod
from projections.apply import apply_batch

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def history() -> list[AuditRecord]:
    """A small log: an agent joins, three tasks run (one fails), and a rejection."""
    events: list[tuple[str, str, Event]] = [("agent-echo-1", "accepted", AgentJoined(id="j", instance="echo-1-x", skills=["echo"]))]
    for t in ("a", "b", "c"):
        events += [
            ("cli-alice", "accepted", TaskSubmitted(id=f"s{t}", task_id=t, skill="echo", input={"t": t})),
            ("agent-echo-1", "accepted", TaskStarted(id=f"st{t}", task_id=t, attempt=1)),
            ("agent-echo-1", "accepted", TaskProgress(id=f"p{t}", task_id=t, attempt=1, message="half", fraction=0.5)),
        ]
    events += [
        ("agent-echo-1", "accepted", TaskCompleted(id="ca", task_id="a", attempt=1, output={"ok": 1})),
        ("agent-echo-1", "rejected", TaskCompleted(id="ca2", task_id="a", attempt=1, output={"ok": 2})),
        ("agent-echo-1", "accepted", TaskFailed(id="fb", task_id="b", attempt=1, error="boom")),
        ("agent-echo-1", "accepted", TaskStarted(id="st2c", task_id="c", attempt=2)),
        ("agent-echo-1", "accepted", TaskCompleted(id="cc", task_id="c", attempt=2, output=None)),
    ]
    return [
        AuditRecord(seq=i, at=T0 + timedelta(seconds=i), verdict=verdict, code="ok" if verdict == "accepted" else "x",
                    reason="", principal=who, kind="k", key="k", msg_id=e.id, ingress_seq=i, delivery=1, event=e)
        for i, (who, verdict, e) in enumerate(events, start=1)
    ]


async def project(path: Path, batches: list[list[AuditRecord]]) -> dict:
    """Apply the batches to a fresh database, reopening it between batches like a restart."""
    for batch in batches:
        db = await dbmod.open_db(path)
        try:
            await apply_batch(db, batch, await dbmod.position(db))
        finally:
            await db.close()
    db = await dbmod.open_db(path)
    try:
        return await dbmod.dump(db)
    finally:
        await db.close()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
async def test_batch_size_restarts_and_redelivery_do_not_change_the_tables(tmp_path: Path, size: int) -> None:
    records = history()
    whole = await project(tmp_path / "whole.db", [records])
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    # Redeliver every batch together with the one before it, as after a crash mid-commit.
    redelivered = [batches[0]] + [batches[i - 1] + batches[i] for i in range(1, len(batches))]
    assert await project(tmp_path / "split.db", redelivered) == whole


async def test_the_tasks_table_follows_each_lifecycle(tmp_path: Path) -> None:
    tables = await project(tmp_path / "p.db", [history()])
    db = await dbmod.open_db(tmp_path / "p.db")
    try:
        async with db.execute("SELECT task_id, status, attempts, output, error FROM tasks ORDER BY task_id") as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
    finally:
        await db.close()
    assert rows == [("a", "completed", 1, '{"ok":1}', None), ("b", "failed", 1, None, "boom"),
                    ("c", "completed", 2, "null", None)]
    assert tables["tracking"] == [("audit", len(history()))]
    [agent] = tables["agents"]
    assert agent[0] == "echo-1" and agent[-4:-1] == (1, 2, 1)  # one join; completed a and c, failed b  # completed a and c, failed b
