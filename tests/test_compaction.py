"""Bounded state: an ``audit_archived`` record lets go of the task trees settled by its cut,
in the router's state and in the projections alike (bus/compaction.py), and nothing else.

The logs are built here (the archiver that writes the record is another module's): a
hand-made one whose every tree is a case, the generated logs of the projection properties
(whose model archives too), and a real router's log with the record appended as the
archiver appends it, followed by late messages about the tasks it let go of.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from ledgerbus.bus import anchor, subjects
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.errors import NotFound
from ledgerbus.bus.events import (
    AgentJoined,
    AgentProposal,
    Budget,
    Event,
    PlanStep,
    PlanSubmitted,
    RetryPolicy,
    SkillUnmatched,
    TaskCancelled,
    TaskCompleted,
    TaskDenied,
    TaskDispatched,
    TaskFailed,
    TaskProgress,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
    kind_of,
    new_id,
)
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.records import ArchiveSeal, AuditRecord, Retention
from ledgerbus.bus.settings import Settings
from ledgerbus.client import Bus
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.apply import apply_batch
from ledgerbus.projections.service import Reader, answer
from ledgerbus.router import audit
from ledgerbus.router import snapshots as snaps
from ledgerbus.router.audit import AuditLog
from ledgerbus.router.state import RouterState
from tests.conftest import RunningRouter
from tests.snapshot_support import assert_snapshots_fold_alike, canonical
from tests.support import audit_records, claim, send, wait_for_record
from tests.test_projection_properties import CAP, RandomPicker, audit_key, build

T0 = datetime(2026, 1, 1, tzinfo=UTC)
Connect = Callable[[str], Awaitable[Client]]


def archive_record(seq: int, at: datetime, through: int) -> AuditRecord:
    """The router's ``audit_archived`` record, as docs/architecture.md describes it."""
    seal = ArchiveSeal(file=f"audit-{1:012d}-{through:012d}.jsonl.gz", first_seq=1, last_seq=through, first_at=T0,
                       last_at=at, prev_hash="0" * 64, last_hash="1" * 64, sha256="2" * 64, bytes=100)
    return AuditRecord(seq=seq, at=at, verdict="accepted", code="ok", reason="", principal="router",
                       kind="audit_archived", key="router", msg_id="", ingress_seq=0, delivery=0,
                       retention=Retention(action="archived", rule="audit_max_age 7d", through_seq=through,
                                           segments=[seal]))


class Log:
    """A hand-made log: records one second apart, each numbered as it is added."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def add(self, who: str, event: Event, code: str = "ok", verdict: str = "accepted") -> int:
        seq = len(self.records) + 1
        self.records.append(AuditRecord(
            seq=seq, at=T0 + timedelta(seconds=seq), verdict=verdict, code=code, reason="", principal=who,  # type: ignore[arg-type]
            kind=kind_of(type(event)), key=audit_key(who, event), msg_id=event.id,
            ingress_seq=0 if who == "router" else seq, delivery=int(who != "router"), event=event,  # type: ignore[arg-type]
        ))
        return seq

    def archive(self, through: int) -> int:
        seq = len(self.records) + 1
        self.records.append(archive_record(seq, T0 + timedelta(seconds=seq), through))
        return seq


OPS, AGENT, BOSS = "cli-ops", "agent-a1", "cli-boss"


def _run(log: Log, task_id: str, usage: int = 0) -> None:
    """A claim of the task and its completion (with ``usage`` tokens reported before)."""
    log.add(AGENT, TaskStarted(id=new_id(), task_id=task_id, attempt=1))
    if usage:
        log.add(AGENT, TaskUsage(id=new_id(), task_id=task_id, attempt=1, tokens_in=usage, tokens_out=1,
                                 cost_usd=0.5, provider="p", model="m", latency_s=2.0))
    log.add(AGENT, TaskCompleted(id=new_id(), task_id=task_id, attempt=1, output={"done": task_id}))


def cases() -> tuple[Log, int]:
    """One tree per case; the cut falls before the last record about ``late``."""
    log = Log()
    log.add(AGENT, AgentJoined(id=new_id(), instance="a1-x", skills=["echo"]))
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="done", skill="echo"))  # settled: goes
    _run(log, "done", usage=10)
    steps = [PlanStep(id="s1", skill="echo"), PlanStep(id="s2", skill="echo", deps=["s1"])]
    for plan in ("open-plan", "done-plan"):
        log.add(OPS, PlanSubmitted(id=new_id(), task_id=plan, steps=steps))
        for step in ("s1", "s2"):
            log.add("router", TaskDispatched(id=new_id(), task_id=f"{plan}-{step}", skill="echo", dispatch=1,
                                             reason="matched", agent="a1"))
            if (plan, step) == ("open-plan", "s2"):
                log.add(AGENT, TaskStarted(id=new_id(), task_id=f"{plan}-{step}", attempt=1))  # still running
            else:
                _run(log, f"{plan}-{step}")
    log.add("router", TaskCompleted(id=new_id(), task_id="done-plan", attempt=1, output={}))
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="denied", skill="deploy"), code="approval_requested")
    log.add(BOSS, TaskDenied(id=new_id(), task_id="denied", reason="no"))
    # A failure with retries left, no decision yet: not settled.
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="retryable", skill="echo", retry=RetryPolicy(max_attempts=3)))
    log.add(AGENT, TaskStarted(id=new_id(), task_id="retryable", attempt=1))
    log.add(AGENT, TaskFailed(id=new_id(), task_id="retryable", attempt=1, error="flaky"))
    # Its budget ended its retries: settled.
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="broke", skill="echo", budget=Budget(tokens=5),
                               retry=RetryPolicy(max_attempts=3)))
    log.add(AGENT, TaskStarted(id=new_id(), task_id="broke", attempt=1))
    log.add(AGENT, TaskUsage(id=new_id(), task_id="broke", attempt=1, tokens_in=9, provider="p", model="m",
                             latency_s=4.0, outcome="ok"), code="budget_exceeded")
    # Completed, but a subtask it delegated still waits: the tree is open.
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="parent", skill="echo"))
    log.add(AGENT, TaskStarted(id=new_id(), task_id="parent", attempt=1))
    log.add(AGENT, TaskSubmitted(id=new_id(), task_id="child", skill="echo", parent_task_id="parent"))
    log.add(AGENT, TaskCompleted(id=new_id(), task_id="parent", attempt=1, output=None))
    # Cancelled while waiting for a match (with a proposal) and while waiting for a retry (a timer).
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="unmatched", skill="summarize"), code="awaiting_match")
    log.add("router", SkillUnmatched(id="proposal-1", task_id="unmatched", capabilities=["summarize"],
                                     proposal=AgentProposal(name="summarizer", skills=["llm.chat"])))
    log.add(OPS, TaskCancelled(id=new_id(), task_id="unmatched"))
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="timer", skill="echo", retry=RetryPolicy(max_attempts=2)))
    log.add(AGENT, TaskFailed(id=new_id(), task_id="timer", attempt=1, error="flaky"))
    log.add("router", TaskRetryScheduled(id=new_id(), task_id="timer", failures=1, not_before=T0 + timedelta(days=9)))
    log.add(OPS, TaskCancelled(id=new_id(), task_id="timer"))
    # Settled, but after the cut.
    log.add(OPS, TaskSubmitted(id=new_id(), task_id="late", skill="echo"))
    log.add(AGENT, TaskStarted(id=new_id(), task_id="late", attempt=1))
    cut = log.records[-1].seq
    log.add(AGENT, TaskCompleted(id=new_id(), task_id="late", attempt=1, output=None))
    log.add(AGENT, TaskCompleted(id=new_id(), task_id="done", attempt=1, output=None), verdict="rejected")
    return log, cut


KEPT = {"open-plan", "open-plan-s1", "open-plan-s2", "retryable", "parent", "child", "late"}
GONE = {"done", "done-plan", "done-plan-s1", "done-plan-s2", "denied", "broke", "unmatched", "timer"}


def fold(records: list[AuditRecord]) -> RouterState:
    state = RouterState()
    for record in records:
        state.apply(record)
    return state


async def project(path: Path, *batches: list[AuditRecord]) -> None:
    db = await dbmod.open_db(path, CAP)
    try:
        for batch in batches:
            await apply_batch(db, batch, await dbmod.position(db))
    finally:
        await db.close()


async def ask(path: Path, query: str, body: dict[str, Any]) -> dict[str, Any]:
    db = await dbmod.open_reader(path)
    try:
        return await answer(Reader(db), subjects.query(*query.split(".")), json.dumps(body).encode())
    finally:
        await db.close()


async def table(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = await dbmod.open_reader(path)
    try:
        async with db.execute(sql) as cur:
            return [tuple(row) for row in await cur.fetchall()]
    finally:
        await db.close()


async def test_an_archive_lets_go_of_settled_trees_only_in_the_router_and_the_projection_alike(tmp_path: Path) -> None:
    log, cut = cases()
    before = fold(log.records)
    assert KEPT | GONE == set(before.tasks)
    await project(tmp_path / "before.db", log.records)
    totals = (await ask(tmp_path / "before.db", "usage.summary", {}))["data"]
    archived_at = log.archive(cut)

    state = fold(log.records)
    assert set(state.tasks) == KEPT
    assert (state.archived_through, state.archived_tasks) == (cut, len(GONE))
    # Nothing is left that names a task let go of: no retry timer, no proposal, no slot.
    assert not [t for _, t in state._timers if t in GONE]
    assert not state.proposals and not state.unmatched
    assert all(not (tasks & GONE) for tasks in state.inflight.values())
    assert state.tasks["parent"].children == ["child"]

    path = tmp_path / "after.db"
    await project(path, log.records)
    rows = await table(path, "SELECT task_id, status FROM tasks ORDER BY task_id")
    assert {task_id for task_id, _ in rows} == KEPT
    assert dict(rows)["open-plan-s1"] == "completed"  # settled, kept with its open plan
    assert await table(path, "SELECT * FROM approvals") == []
    assert await table(path, "SELECT * FROM proposals") == []
    assert await table(path, "SELECT * FROM usage") == []  # only "done" and "broke" spent
    # The audit index holds what the live log does: the records after the cut.
    assert [seq for (seq,) in await table(path, "SELECT seq FROM audit_index ORDER BY seq")] == list(
        range(cut + 1, archived_at + 1))
    assert await table(path, "SELECT through_seq, seq, rule, tasks FROM archives") == [
        (cut, archived_at, "audit_max_age 7d", len(GONE))]
    # What was spent still counts.
    assert (await ask(path, "usage.summary", {}))["data"] == totals
    [agent] = await table(path, "SELECT name, tasks_completed FROM agents")
    assert agent == ("a1", 6)  # counters are per agent: they stay

    gone = await ask(path, "tasks.get", {"task_id": "done"})
    assert gone["code"] == "not_found"
    assert "no task done" in gone["error"] and f"settled by seq {cut} and was archived" in gone["error"]
    kept = await ask(path, "tasks.get", {"task_id": "open-plan", "tree": True})
    assert kept["ok"] and kept["data"]["subtasks"] == ["open-plan-s1", "open-plan-s2"]


async def test_an_expired_archive_segment_changes_no_state(tmp_path: Path) -> None:
    log, cut = cases()
    archived = archive_record(len(log.records) + 1, T0 + timedelta(days=1), cut)
    assert archived.retention is not None
    expired = msgspec.structs.replace(archived, kind="archive_expired", retention=msgspec.structs.replace(
        archived.retention, action="expired", rule="archive_max_age 90d"))
    log.records.append(expired)
    assert canonical(fold(log.records)) == canonical(fold(log.records[:-1]))
    await project(tmp_path / "with.db", log.records)
    await project(tmp_path / "without.db", log.records[:-1])
    with_it, without = await dump(tmp_path / "with.db"), await dump(tmp_path / "without.db")
    for name in ("tracking", "audit_index"):  # the record is applied and indexed, nothing else
        with_it.pop(name), without.pop(name)
    assert with_it == without


async def test_a_reused_task_id_after_an_archive_is_a_new_task(tmp_path: Path) -> None:
    log, cut = cases()
    log.archive(cut)
    submitted = log.add(OPS, TaskSubmitted(id=new_id(), task_id="done", skill="echo", input={"again": True}))
    state = fold(log.records)
    assert state.tasks["done"].last_seq == submitted and state.tasks["done"].status == "pending"
    await project(tmp_path / "p.db", log.records)
    [row] = await table(tmp_path / "p.db", "SELECT status, input, submitted_seq, output FROM tasks WHERE task_id = 'done'")
    assert row == ("pending", '{"again":true}', submitted, None)


async def test_rebuild_equals_live_wherever_the_batches_cut_around_the_archive(tmp_path: Path) -> None:
    log, cut = cases()
    at = log.archive(cut)
    _run(log, "child")  # the open tree goes on after the archive
    records = log.records
    await project(tmp_path / "whole.db", records)
    whole = await dump(tmp_path / "whole.db")
    for edge in (1, at - 2, at - 1, at, at + 1, len(records) - 1):
        path = tmp_path / f"split-{edge}.db"
        # The archive last in a batch, first in one, alone, and inside one.
        await project(path, records[:edge], records[edge:at], records[at:])
        assert await dump(path) == whole, f"batches cut at {edge} and {at}"


async def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = await dbmod.open_db(path, CAP)
    try:
        return await dbmod.dump(db)
    finally:
        await db.close()


def loaded(records: list[AuditRecord], at: int) -> RouterState:
    """The state a snapshot taken after record ``at`` gives, the records after it folded on."""
    head = ChainHead(at, records[at - 1].hash) if at else ChainHead()
    body = msgspec.msgpack.decode(snaps.encode_state(fold(records[:at]), head), type=snaps.Body)
    state = snaps.restore(body, {r.seq: r for r in records}, 24 * 3600)
    for record in records[at:]:
        state.apply(record)
    return state


def test_a_snapshot_before_or_after_the_archive_folds_on_to_the_whole_logs_state() -> None:
    log, cut = cases()
    log.archive(cut)
    _run(log, "child")
    whole = canonical(fold(log.records))
    for at in range(len(log.records) + 1):
        assert canonical(loaded(log.records, at)) == whole, f"a snapshot at seq {at}"


def test_on_generated_logs_the_router_and_the_projection_keep_the_same_tasks(tmp_path: Path) -> None:
    async def run() -> int:
        archives = 0
        for seed in range(12):
            builder = build(RandomPicker(seed), 60)
            records = builder.records
            state = RouterState()
            path = tmp_path / f"{seed}.db"
            db = await dbmod.open_db(path, CAP)
            try:
                for i, record in enumerate(records):
                    state.apply(record)
                    if record.retention is None:
                        continue
                    archives += 1
                    await apply_batch(db, records[: i + 1], await dbmod.position(db))
                    async with db.execute("SELECT task_id FROM tasks") as cur:
                        ids = {row[0] for row in await cur.fetchall()}
                    assert set(state.tasks) == ids == set(builder.truth[i].tasks), f"seed {seed} at seq {i + 1}"
            finally:
                await db.close()
            for at in sorted({0, len(records) // 2, len(records)}):
                assert canonical(loaded(records, at)) == canonical(state), f"seed {seed}, a snapshot at {at}"
        return archives

    assert asyncio.run(run()) >= 12


# -- a real router -------------------------------------------------------------------------


async def append_archive(nc: Client) -> AuditRecord:
    """Append an ``audit_archived`` record cutting the whole log so far, as the archiver
    does (the router stopped): sealed onto the chain head, stored as the next record."""
    js = nc.jetstream()
    head = await audit.recover(js, RouterState(), anchor.Watch())
    publisher = await Publisher(nc).start()
    try:
        log = AuditLog(publisher, head)
        record, data = log.seal(archive_record(0, datetime.now(UTC), head.seq))
        await log.append([(record, data, {})])
    finally:
        await publisher.close()
    return record


async def test_late_messages_about_archived_tasks_are_refused_naming_the_archive(
    connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    rr = RunningRouter(await connect_as("router"), settings)
    await rr.start()
    cli, agent, js = await connect_as("cli"), await connect_as("agent"), admin.jetstream()
    for task_id in ("done", "open", "dropped"):
        await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id=task_id, skill="echo"))
    await send(agent, "agent", "worker-1", claim(settings, "worker-1", "done", "echo"))
    await send(agent, "agent", "worker-1", TaskCompleted(id=new_id(), task_id="done", attempt=1, output=1))
    await send(cli, "cli", "alice", TaskCancelled(id=new_id(), task_id="dropped"))
    await wait_for_record(js, lambda r: r.kind == "task_cancelled")
    await rr.stop()
    archived = await append_archive(rr.nc)

    router = await rr.start()
    assert set(router.state.tasks) == {"open"}
    late = [
        ("agent", "worker-1", TaskCompleted(id=new_id(), task_id="done", attempt=1, output=2)),
        ("agent", "worker-1", TaskProgress(id=new_id(), task_id="done", attempt=1, message="still here")),
        ("agent", "worker-1", claim(settings, "worker-1", "done", "echo", attempt=2)),
        ("agent", "worker-1", TaskCompleted(id=new_id(), task_id="ghost", attempt=1)),  # never was
        ("cli", "alice", TaskCancelled(id=new_id(), task_id="dropped")),
        ("cli", "alice", TaskSubmitted(id=new_id(), task_id="sub", skill="echo", parent_task_id="done")),
        ("cli", "alice", TaskCancelled(id=new_id(), task_id="open")),  # still held: accepted
        ("cli", "alice", TaskSubmitted(id=new_id(), task_id="done", skill="echo")),  # a new task
    ]
    for role, name, event in late:
        await send(cli if role == "cli" else agent, role, name, event)
    await wait_for_record(js, lambda r: r.seq > archived.seq and r.kind == "task_submitted" and r.key == "done")
    await rr.stop()

    records = await audit_records(js)
    after = [r for r in records if r.seq > archived.seq and r.principal != "router"]
    assert [(r.kind, r.key, r.code) for r in after] == [
        ("task_completed", "done", "unknown_task"),
        ("task_progress", "done", "unknown_task"),
        ("task_started", "done", "unknown_task"),
        ("task_completed", "ghost", "unknown_task"),
        ("task_cancelled", "dropped", "unknown_task"),
        ("task_submitted", "sub", "unknown_task"),
        ("task_cancelled", "open", "ok"),
        ("task_submitted", "done", "ok"),
    ]
    assert archived.retention is not None
    cut = archived.retention.through_seq
    for record in after[:6]:
        assert f"settled by seq {cut} and was archived" in record.reason
    assert after[0].reason.startswith("no task done:") and after[5].reason.startswith("no parent task done:")

    # What a person asking about them sees (agentctl tasks show): the projection's answer,
    # not a view made from what AUDIT still holds.
    path = tmp_path / "p.db"
    await project(path, records)
    db = await dbmod.open_reader(path)
    try:
        bus = Bus(cli, settings, subjects.principal("cli", "alice"), reader=Reader(db))
        for task_id in ("dropped", "ghost"):  # its submission applied and compacted; only refusals
            with pytest.raises(NotFound, match=f"no task {task_id}: .* settled by seq {cut} and was archived"):
                await bus.get(task_id)
        assert (await bus.get("done"))["status"] == "pending"  # the new one
    finally:
        await db.close()
    # A snapshot on either side of the archive, and the tail after it, fold as the whole log does.
    assert await assert_snapshots_fold_alike(js, settings, points=len(records)) == records[-1].seq
