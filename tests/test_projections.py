"""Projections on real SQLite: batch boundaries and redelivery never change the result."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ledgerbus.bus.events import (
    AgentJoined,
    Event,
    TaskCancelled,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskProgress,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
)
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.apply import apply_batch
from ledgerbus.projections.db import iso

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def records(events: list[tuple[str, str, Event]], code: dict[int, str] | None = None) -> list[AuditRecord]:
    """Audit records for ``(principal, verdict, event)`` triples, one second apart."""
    return [
        AuditRecord(seq=i, at=T0 + timedelta(seconds=i), verdict=verdict,
                    code=(code or {}).get(i, "ok" if verdict == "accepted" else "x"),
                    reason="", principal=who, kind="k", key="k", msg_id=e.id, ingress_seq=i, delivery=1, event=e)
        for i, (who, verdict, e) in enumerate(events, start=1)
    ]


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
    return records(events)


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


async def rows_of(path: Path, sql: str) -> list[tuple]:
    db = await dbmod.open_db(path)
    try:
        async with db.execute(sql) as cur:
            return [tuple(r) for r in await cur.fetchall()]
    finally:
        await db.close()


async def test_a_retried_task_row_describes_its_current_attempt(tmp_path: Path) -> None:
    retry_at = T0 + timedelta(minutes=5)
    log = records([
        ("cli-alice", "accepted", TaskSubmitted(id="s", task_id="t", skill="echo", input={})),
        ("agent-echo-1", "accepted", TaskStarted(id="st1", task_id="t", attempt=1)),
        ("agent-echo-1", "accepted", TaskFailed(id="f1", task_id="t", attempt=1, error="flaky")),
        ("router", "accepted", TaskRetryScheduled(id="r1", task_id="t", failures=1, not_before=retry_at)),
    ])
    sql = "SELECT status, attempts, finished_at IS NULL, error, retry_at, agent FROM tasks"
    await project(tmp_path / "p.db", [log])
    # While it waits, the row says why (the last error) and when it goes again.
    assert await rows_of(tmp_path / "p.db", sql) == [("retrying", 1, 0, "flaky", iso(retry_at), "echo-1")]
    more = records([
        *[(r.principal, r.verdict, r.event) for r in log],
        ("router", "accepted", TaskDispatched(id="d2", task_id="t", skill="echo", dispatch=2, attempt_base=1,
                                              reason="retry")),
        ("agent-echo-2", "accepted", TaskStarted(id="st2", task_id="t", attempt=2)),
    ])
    await project(tmp_path / "q.db", [more])
    # The second attempt runs: nothing of the first (its end, its error) is left on the row.
    assert await rows_of(tmp_path / "q.db", sql) == [("running", 2, 1, None, None, "echo-2")]


async def test_cancelling_clears_a_pending_retry_and_closes_a_held_approval(tmp_path: Path) -> None:
    log = records([
        ("cli-alice", "accepted", TaskSubmitted(id="s", task_id="t", skill="echo", input={})),
        ("agent-echo-1", "accepted", TaskFailed(id="f1", task_id="t", attempt=1, error="flaky")),
        ("router", "accepted", TaskRetryScheduled(id="r1", task_id="t", failures=1, not_before=T0)),
        ("cli-alice", "accepted", TaskCancelled(id="c1", task_id="t", reason="not needed")),
        ("cli-alice", "accepted", TaskSubmitted(id="s2", task_id="held", skill="shell", input={})),
        ("cli-alice", "accepted", TaskCancelled(id="c2", task_id="held")),
    ], code={5: "approval_requested"})
    await project(tmp_path / "p.db", [log])
    assert await rows_of(tmp_path / "p.db", "SELECT task_id, status, retry_at FROM tasks ORDER BY task_id") == [
        ("held", "cancelled", None), ("t", "cancelled", None)]
    # Nobody approves a task that no longer exists.
    assert await rows_of(tmp_path / "p.db", "SELECT task_id, status, decided_by FROM approvals") == [
        ("held", "cancelled", "cli-alice")]
