"""Property: the projections are a pure function of the log.

Any valid log (what the router would accept, with some rejections mixed in), applied in
batches of any sizes, with the projector killed and restarted between any batches or in
the middle of one, and with already-applied records redelivered, gives exactly the
database that applying the whole log in one go gives. No NATS: records are built here.

The logs come from :func:`build_log`, a small model of the router's rules driven by a
:class:`Picker`: Hypothesis draws each choice in the property test, and a seeded
``random.Random`` draws them in the plain tests.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import aiosqlite
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bus.events import (
    AGENT_EVENTS,
    MEMORY_EVENTS,
    TASK_EVENTS,
    AgentJoined,
    AgentLeft,
    AnyEvent,
    AuditRecord,
    Budget,
    Checkpoint,
    CheckpointRestored,
    CheckpointSaved,
    MemoryWiped,
    MemoryWritten,
    SharedWritten,
    TaskApproved,
    TaskCompleted,
    TaskDenied,
    TaskFailed,
    TaskProgress,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
    Verdict,
    kind_of,
)
from projections import apply as applymod
from projections import db as dbmod
from projections.apply import apply_batch

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CAP = 4  # memory_list_cap: small, so the generated logs roll lists into summaries
AGENTS = ("a1", "a2", "a3")
OPS = "cli-ops"
BOSS = "cli-boss"  # the approver
HELD_SKILL = "deploy"  # submissions of it are held for approval
CHECKPOINT_IDS = ("c0", "c1", "c2", "c3")  # shared between agents: the key is (agent, id)
NAMESPACES = ("ns1", "ns2")
SHARED_KEYS = ("x", "y", "z")
KNOWLEDGE_KEYS = ("k1", "k2", "k3")
TTLS = (1.0, 1.0, 2.0, 2.5, 3.0, 5.0)
GAPS_US = (1_000_000, 1_000_000, 1_000_000, 500_000, 2_000_000, 1)  # time between records, microseconds
LISTS: tuple[Literal["observation", "reasoning"], ...] = ("observation", "observation", "reasoning")
VALUES: tuple[Any, ...] = (0, 1, -7, 2.5, True, "x", "héllo", {"a": 1}, [1, 2], {"nested": {"b": [None]}})

T = TypeVar("T")


class Picker(Protocol):
    """Where the log builder's choices come from."""

    def choice(self, options: Sequence[T]) -> T: ...

    def integer(self, lo: int, hi: int) -> int: ...


class DrawPicker:
    """Choices drawn by Hypothesis (so failing logs shrink)."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))


class RandomPicker:
    """Choices from a seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choice(self, options: Sequence[T]) -> T:
        return self.rng.choice(options)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


# -- the model: what the router knows, so the log only holds what it would accept ---------


@dataclass
class TaskModel:
    skill: str
    submitter: str
    status: str  # awaiting_approval, pending, running, completed, failed, denied
    budget: int | None
    claimant: str = ""
    attempt: int = 0
    tokens: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "denied")


@dataclass
class LogBuilder:
    pick: Picker
    records: list[AuditRecord] = field(default_factory=list)
    at: datetime = T0
    tasks: dict[str, TaskModel] = field(default_factory=dict)
    instances: dict[str, list[str]] = field(default_factory=dict)  # agent -> its instances, newest last
    checkpoints: dict[str, list[str]] = field(default_factory=dict)  # agent -> its checkpoint ids
    last_router_checkpoint: int = 0

    # -- emitting ---------------------------------------------------------------------------

    def emit(
        self, principal: str, ev: AnyEvent, verdict: Verdict = "accepted", code: str = "ok", reason: str = ""
    ) -> None:
        seq = len(self.records) + 1
        self.at += timedelta(microseconds=self.pick.choice(GAPS_US))
        self.records.append(AuditRecord(
            seq=seq, at=self.at, verdict=verdict, code=code, reason=reason, principal=principal,
            kind=kind_of(type(ev)), key=audit_key(principal, ev), msg_id=f"m{seq}", ingress_seq=seq, delivery=1,
            trace_id=f"tr{seq}" if isinstance(ev, TaskSubmitted) else "", event=ev,
        ))

    def reject(self, principal: str, ev: AnyEvent, code: str) -> None:
        self.emit(principal, ev, verdict="rejected", code=code, reason=f"refused: {code}")

    def router_checkpoint(self) -> None:
        seq = len(self.records) + 1
        self.at += timedelta(microseconds=self.pick.choice(GAPS_US))
        checkpoint = Checkpoint(covers_seq=seq - 1, chain_head="0" * 64,
                                prev_checkpoint_seq=self.last_router_checkpoint, key_id="k", at=self.at, signature="s")
        self.records.append(AuditRecord(
            seq=seq, at=self.at, verdict="accepted", code="ok", reason="", principal="router", kind="checkpoint",
            key="router", msg_id="", ingress_seq=0, delivery=0, checkpoint=checkpoint,
        ))
        self.last_router_checkpoint = seq

    def mid(self) -> str:
        return f"m{len(self.records) + 1}"

    def value(self) -> Any:
        return self.pick.choice(VALUES)

    # -- what can happen next --------------------------------------------------------------

    def step(self) -> None:
        running = [t for t, m in self.tasks.items() if m.status == "running"]
        actions = ["memory", "session", "session", "burst", "shared", "shared", "reject", "reject", "join", "submit",
                   "submit", "save", "rollback", "wipe", "router_checkpoint"]
        if any(self.instances.values()):
            actions.append("leave")
        if any(m.status in ("pending", "running") for m in self.tasks.values()):
            actions += ["start", "start"]
        if running:
            actions += ["report", "report", "report", "subtask"]
        if any(m.status == "awaiting_approval" for m in self.tasks.values()):
            actions.append("decide")
        if any(self.checkpoints.values()):
            actions += ["restore", "restore"]
        getattr(self, f"do_{self.pick.choice(actions)}")()

    def do_join(self) -> None:
        agent = self.pick.choice(AGENTS)
        instance = f"{agent}-i{len(self.records)}"
        self.instances.setdefault(agent, []).append(instance)
        skills = self.pick.choice((["echo"], ["echo", HELD_SKILL], [HELD_SKILL]))
        self.emit(f"agent-{agent}", AgentJoined(id=self.mid(), instance=instance, skills=skills,
                                                concurrency=self.pick.integer(1, 3)))

    def do_leave(self) -> None:
        agent = self.pick.choice([a for a in AGENTS if self.instances.get(a)])
        # The newest instance (the agent goes offline) or an older replica (it stays online).
        instance = self.pick.choice(self.instances[agent][::-1])
        self.emit(f"agent-{agent}", AgentLeft(id=self.mid(), instance=instance, reason="drained"))

    def _submit(self, principal: str, parent: str | None) -> None:
        task_id = f"t{len(self.tasks)}"
        skill = self.pick.choice(("echo", "echo", HELD_SKILL))
        budget = self.pick.choice((None, 20, 40))
        held = skill == HELD_SKILL
        self.tasks[task_id] = TaskModel(skill=skill, submitter=principal,
                                        status="awaiting_approval" if held else "pending", budget=budget)
        self.emit(principal, TaskSubmitted(
            id=self.mid(), task_id=task_id, skill=skill, input={"n": len(self.records), "v": self.value()},
            timeout_s=self.pick.choice((30.0, 300.0)), budget=None if budget is None else Budget(tokens=budget),
            parent_task_id=parent,
        ), code="approval_requested" if held else "ok")

    def do_submit(self) -> None:
        self._submit(OPS, None)

    def do_subtask(self) -> None:
        parent = self.pick.choice([t for t, m in self.tasks.items() if m.status == "running"])
        self._submit(self.tasks[parent].claimant, parent)

    def do_decide(self) -> None:
        task_id = self.pick.choice([t for t, m in self.tasks.items() if m.status == "awaiting_approval"])
        reason = self.pick.choice(("", "looks fine", "too risky"))
        if self.pick.choice((True, False)):
            self.tasks[task_id].status = "pending"
            self.emit(BOSS, TaskApproved(id=self.mid(), task_id=task_id, reason=reason))
        else:
            self.tasks[task_id].status = "denied"
            self.emit(BOSS, TaskDenied(id=self.mid(), task_id=task_id, reason=reason))

    def do_start(self) -> None:
        task_id = self.pick.choice([t for t, m in self.tasks.items() if m.status in ("pending", "running")])
        task = self.tasks[task_id]
        agent = self.pick.choice(AGENTS)  # a redelivery may go to another agent
        task.status, task.claimant = "running", f"agent-{agent}"
        task.attempt += self.pick.integer(1, 2)
        self.emit(task.claimant, TaskStarted(id=self.mid(), task_id=task_id, attempt=task.attempt))

    def do_report(self) -> None:
        task_id = self.pick.choice([t for t, m in self.tasks.items() if m.status == "running"])
        task = self.tasks[task_id]
        who, attempt = task.claimant, task.attempt
        match self.pick.choice(("progress", "usage", "usage", "complete", "fail")):
            case "progress":
                fraction = self.pick.choice((None, 0.0, 0.5, 1.0))
                self.emit(who, TaskProgress(id=self.mid(), task_id=task_id, attempt=attempt,
                                            message=self.pick.choice(("", "working", "almost")), fraction=fraction))
            case "usage":
                tokens_in, tokens_out = self.pick.integer(0, 25), self.pick.integer(0, 10)
                task.tokens += tokens_in + tokens_out
                code, reason = "ok", ""
                if task.budget is not None and task.tokens > task.budget:
                    task.status = "failed"
                    code, reason = "budget_exceeded", f"{task.tokens} tokens used of a budget of {task.budget}"
                self.emit(who, TaskUsage(id=self.mid(), task_id=task_id, attempt=attempt, tokens_in=tokens_in,
                                         tokens_out=tokens_out, cost_usd=self.pick.choice((0.0, 0.25, 0.001)),
                                         provider="p", model="m"), code=code, reason=reason)
            case "complete":
                task.status = "completed"
                self.emit(who, TaskCompleted(id=self.mid(), task_id=task_id, attempt=attempt,
                                             output=self.pick.choice((None, *VALUES))))
            case _:
                task.status = "failed"
                self.emit(who, TaskFailed(id=self.mid(), task_id=task_id, attempt=attempt, error="boom"))

    def _writer(self, agent: str) -> str:
        return self.pick.choice((f"agent-{agent}", f"agent-{agent}", OPS))

    def do_memory(self) -> None:
        self.write_memory(self.pick.choice(AGENTS))

    def write_memory(self, agent: str) -> None:
        section = self.pick.choice(("observation", "observation", "reasoning", "knowledge", "knowledge", "role"))
        match section:
            case "knowledge":
                key = self.pick.choice(KNOWLEDGE_KEYS)
                if self.pick.integer(0, 3) == 0:
                    ev = MemoryWritten(id=self.mid(), agent=agent, section="knowledge", key=key, value=None)
                else:
                    ev = MemoryWritten(id=self.mid(), agent=agent, section="knowledge", key=key, value=self.value(),
                                       core=self.pick.choice((False, True)))
            case "role":
                ev = MemoryWritten(id=self.mid(), agent=agent, section="role",
                                   value=self.pick.choice((None, "planner", "critic", {"style": "terse"})))
            case _:
                ev = MemoryWritten(id=self.mid(), agent=agent, section=section,  # type: ignore[arg-type]
                                   value=self.pick.choice((None, *VALUES)))
        self.emit(self._writer(agent), ev)

    def do_session(self) -> None:
        """Writes, forgets and wipes of one agent's memory with no checkpoint between, so a
        wipe meets knowledge written in the same batch, and forgets meet keys written before."""
        agent = self.pick.choice(AGENTS)
        for _ in range(self.pick.integer(2, 6)):
            if self.pick.integer(0, 4) == 0:
                self.emit(self._writer(agent), MemoryWiped(id=self.mid(), agent=agent))
            else:
                self.write_memory(agent)

    def do_burst(self) -> None:
        """Several appends to one list of one agent, so lists go over the cap."""
        agent = self.pick.choice(AGENTS)
        section = self.pick.choice(LISTS)
        for _ in range(self.pick.integer(2, CAP + 3)):
            self.emit(self._writer(agent), MemoryWritten(id=self.mid(), agent=agent, section=section,
                                                         value=self.value()))

    def do_wipe(self) -> None:
        agent = self.pick.choice(AGENTS)
        self.emit(self._writer(agent), MemoryWiped(id=self.mid(), agent=agent, reason="fresh start"))

    def do_save(self) -> None:
        agent = self.pick.choice(AGENTS)
        if not self.save(agent):
            self.restore(agent)

    def save(self, agent: str) -> bool:
        free = [c for c in CHECKPOINT_IDS if c not in self.checkpoints.get(agent, [])]
        if not free:
            return False
        cid = self.pick.choice(free)
        self.checkpoints.setdefault(agent, []).append(cid)
        state = self.pick.choice((None, None, {"cursor": len(self.records)}, [1, "two"]))
        self.emit(self._writer(agent), CheckpointSaved(id=self.mid(), agent=agent, checkpoint_id=cid,
                                                       label=self.pick.choice(("", "before")), state=state))
        return True

    def do_restore(self) -> None:
        self.restore(self.pick.choice([a for a in AGENTS if self.checkpoints.get(a)]))

    def do_rollback(self) -> None:
        """Save a checkpoint, change the memory, and go back: all close together, often in one batch."""
        agent = self.pick.choice(AGENTS)
        self.save(agent)
        for _ in range(self.pick.integer(1, 4)):
            if self.pick.integer(0, 5) == 0:
                self.emit(self._writer(agent), MemoryWiped(id=self.mid(), agent=agent))
            else:
                self.write_memory(agent)
        self.restore(agent)

    def restore(self, agent: str) -> None:
        cid = self.pick.choice(self.checkpoints[agent][::-1])  # the newest first
        self.emit(self._writer(agent), CheckpointRestored(id=self.mid(), agent=agent, checkpoint_id=cid))

    def do_shared(self) -> None:
        """One to three writes of one key: sets, with or without a ttl, and deletes."""
        namespace, key = self.pick.choice(NAMESPACES), self.pick.choice(SHARED_KEYS)
        for _ in range(self.pick.integer(1, 3)):
            writer = self.pick.choice((OPS, *(f"agent-{a}" for a in AGENTS)))
            value = self.pick.choice((None, None, *VALUES))
            ttl = None if value is None else self.pick.choice((None, None, None, *TTLS))
            self.emit(writer, SharedWritten(id=self.mid(), namespace=namespace, key=key, value=value, ttl_s=ttl))

    def do_router_checkpoint(self) -> None:
        self.router_checkpoint()

    def do_reject(self) -> None:
        """A message the router refuses: it must change nothing but the audit index."""
        kinds = ["unknown_task", "not_memory_owner", "unknown_checkpoint"]
        running = [t for t, m in self.tasks.items() if m.status == "running"]
        terminal = [t for t, m in self.tasks.items() if m.terminal]
        held = [t for t, m in self.tasks.items() if m.status == "awaiting_approval"]
        pending = [t for t, m in self.tasks.items() if m.status == "pending"]
        saved = [a for a in AGENTS if self.checkpoints.get(a)]
        kinds += ["not_claimant"] * bool(running) + ["task_terminal"] * bool(terminal)
        kinds += ["duplicate_task"] * bool(self.tasks) + ["awaiting_approval", "self_approval"] * bool(held)
        kinds += ["not_awaiting_approval"] * bool(pending) + ["duplicate_checkpoint"] * bool(saved)
        agent = self.pick.choice(AGENTS)
        match self.pick.choice(kinds):
            case "unknown_task":
                self.reject(f"agent-{agent}", TaskProgress(id=self.mid(), task_id="nope", attempt=1), "unknown_task")
            case "not_memory_owner":
                other = self.pick.choice([a for a in AGENTS if a != agent])
                self.reject(f"agent-{other}", MemoryWritten(id=self.mid(), agent=agent, section="observation",
                                                            value="not mine"), "not_memory_owner")
            case "unknown_checkpoint":
                self.reject(OPS, CheckpointRestored(id=self.mid(), agent=agent, checkpoint_id="zz"),
                            "unknown_checkpoint")
            case "not_claimant":
                task_id = self.pick.choice(running)
                task = self.tasks[task_id]
                if self.pick.choice((True, False)):  # the right agent, a stale attempt
                    who, attempt = task.claimant, max(1, task.attempt - 1)
                    if attempt == task.attempt:
                        attempt += 1
                else:
                    others = [f"agent-{a}" for a in AGENTS if f"agent-{a}" != task.claimant]
                    who, attempt = self.pick.choice(others), task.attempt
                results: tuple[AnyEvent, ...] = (
                    TaskCompleted(id=self.mid(), task_id=task_id, attempt=attempt, output="stolen"),
                    TaskFailed(id=self.mid(), task_id=task_id, attempt=attempt, error="not me"),
                    TaskUsage(id=self.mid(), task_id=task_id, attempt=attempt, tokens_in=999),
                )
                self.reject(who, self.pick.choice(results), "not_claimant")
            case "task_terminal":
                task_id = self.pick.choice(terminal)
                late: tuple[AnyEvent, ...] = (
                    TaskCompleted(id=self.mid(), task_id=task_id, attempt=9, output="late"),
                    TaskStarted(id=self.mid(), task_id=task_id, attempt=99),
                )
                self.reject(f"agent-{agent}", self.pick.choice(late), "task_terminal")
            case "duplicate_task":
                task_id = self.pick.choice(list(self.tasks))
                self.reject(OPS, TaskSubmitted(id=self.mid(), task_id=task_id, skill="other", input={"dup": True}),
                            "duplicate_task")
            case "awaiting_approval":
                task_id = self.pick.choice(held)
                start = TaskStarted(id=self.mid(), task_id=task_id, attempt=1)
                self.reject(f"agent-{agent}", start, "awaiting_approval")
            case "self_approval":
                task_id = self.pick.choice(held)
                approval = TaskApproved(id=self.mid(), task_id=task_id)
                self.reject(self.tasks[task_id].submitter, approval, "self_approval")
            case "not_awaiting_approval":
                task_id = self.pick.choice(pending)
                self.reject(BOSS, TaskDenied(id=self.mid(), task_id=task_id, reason="late"), "not_awaiting_approval")
            case _:
                owner = self.pick.choice(saved)
                self.reject(OPS, CheckpointSaved(id=self.mid(), agent=owner, checkpoint_id=self.checkpoints[owner][0],
                                                 state={"overwrite": True}), "duplicate_checkpoint")


def audit_key(principal: str, ev: AnyEvent) -> str:
    """The audit key the router gives a record (see router.app._record_for)."""
    if isinstance(ev, TASK_EVENTS):
        return ev.task_id
    if isinstance(ev, AGENT_EVENTS):
        return principal.partition("-")[2]
    if isinstance(ev, MEMORY_EVENTS):
        return ev.agent
    if isinstance(ev, SharedWritten):
        return ev.namespace
    return "_"


def build_log(pick: Picker, steps: int) -> list[AuditRecord]:
    """A valid log of about ``steps`` messages (bursts add several records)."""
    builder = LogBuilder(pick)
    for _ in range(steps):
        builder.step()
    if not builder.records:
        builder.router_checkpoint()
    return builder.records


# -- how the log is delivered to the projector --------------------------------------------


class Step(NamedTuple):
    """One batch: ``log[start - overlap : end]``, the first ``overlap`` records redelivered."""

    start: int
    end: int
    overlap: int
    restart: bool  # the projector is killed and restarted before this batch
    crash_at: int | None  # killed in the middle of this batch, after this many projections
    stale: tuple[int, int] | None  # afterwards, redeliver log[a:b], all already applied


@st.composite
def plans(draw: st.DrawFn, n: int) -> list[Step]:
    bounds = [0]
    while bounds[-1] < n:
        left = n - bounds[-1]
        bounds.append(bounds[-1] + draw(st.integers(1, left) | st.integers(1, min(left, 6))))
    steps = []
    for start, end in pairwise(bounds):
        stale = None
        if draw(st.booleans()):
            a = draw(st.integers(0, end - 1))
            stale = (a, draw(st.integers(a + 1, end)))
        steps.append(Step(
            start=start, end=end, overlap=draw(st.integers(0, start)), restart=draw(st.booleans()),
            crash_at=draw(st.none() | st.none() | st.integers(0, len(applymod.PROJECTIONS))), stale=stale,
        ))
    return steps


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[AuditRecord], list[Step]]:
    log = build_log(DrawPicker(draw), draw(st.integers(1, 45)))
    return log, draw(plans(len(log)))


class Killed(Exception):
    """The projector died in the middle of a batch."""


async def _die(db: aiosqlite.Connection, records: Sequence[AuditRecord]) -> None:
    raise Killed


@contextmanager
def killed_after(count: int) -> Iterator[None]:
    """Make apply_batch die after running ``count`` of the projections."""
    original = dict(applymod.PROJECTIONS)
    items = list(original.items())
    items.insert(count, ("die", _die))
    applymod.PROJECTIONS.clear()
    applymod.PROJECTIONS.update(items)
    try:
        yield
    finally:
        applymod.PROJECTIONS.clear()
        applymod.PROJECTIONS.update(original)


Dump = dict[str, list[tuple[Any, ...]]]


async def dump_of(path: Path) -> Dump:
    db = await dbmod.open_db(path, CAP)
    try:
        return await dbmod.dump(db)
    finally:
        await db.close()


async def project_whole(path: Path, log: Sequence[AuditRecord]) -> Dump:
    db = await dbmod.open_db(path, CAP)
    try:
        assert await apply_batch(db, log, await dbmod.position(db)) == log[-1].seq
    finally:
        await db.close()
    return await dump_of(path)


async def project_plan(path: Path, log: Sequence[AuditRecord], plan: Sequence[Step]) -> Dump:
    """Apply ``log`` as ``plan`` says, keeping the position in memory as the projector does.

    After every batch the tables must equal those of a database fed the same records one
    at a time (the other extreme of batching), so a difference is caught where it arises,
    before later records can hide it.
    """
    db = await dbmod.open_db(path, CAP)
    reference = await dbmod.open_db(path.with_name(f"one-by-one-{path.name}"), CAP)
    position = 0
    try:
        for step in plan:
            if step.restart:
                await db.close()
                db = await dbmod.open_db(path, CAP)
                assert await dbmod.position(db) == position
            batch = log[step.start - step.overlap : step.end]
            if step.crash_at is not None:
                before = await dbmod.dump(db)
                with killed_after(step.crash_at), pytest.raises(Killed):
                    await apply_batch(db, batch, position)
                await db.close()
                db = await dbmod.open_db(path, CAP)
                assert await dbmod.position(db) == position
                assert await dbmod.dump(db) == before, "a batch that died half way must leave no trace"
            position = await apply_batch(db, batch, position)
            assert position == step.end
            for record in log[step.start : step.end]:
                await apply_batch(reference, [record], record.seq - 1)
            assert await dbmod.dump(db) == await dbmod.dump(reference), f"after records {step.start + 1}..{step.end}"
            if step.stale is not None:
                before = await dbmod.dump(db)
                a, b = step.stale
                assert await apply_batch(db, log[a:b], position) == position
                assert await dbmod.dump(db) == before, f"redelivering records {a + 1}..{b} changed the tables"
    finally:
        await db.close()
        await reference.close()
    return await dump_of(path)


def neutralised(log: Sequence[AuditRecord]) -> list[AuditRecord]:
    """The log with every rejected record replaced by a record that carries no event."""
    return [
        r if r.accepted else AuditRecord(
            seq=r.seq, at=r.at, verdict="accepted", code="ok", reason="", principal="router", kind="checkpoint",
            key="router", msg_id="", ingress_seq=0, delivery=0,
        )
        for r in log
    ]


def shared_model(log: Sequence[AuditRecord]) -> set[tuple[str, str]]:
    """The shared keys that should be left: the last write set a value that has not expired."""
    last: dict[tuple[str, str], AuditRecord] = {}
    for r in log:
        if r.accepted and isinstance(r.event, SharedWritten):
            last[(r.event.namespace, r.event.key)] = r
    now = log[-1].at
    return {
        k for k, r in last.items()
        if isinstance(r.event, SharedWritten) and r.event.value is not None
        and (r.event.ttl_s is None or r.at + timedelta(seconds=r.event.ttl_s) > now)
    }


def expires_mid_log(log: Sequence[AuditRecord], i: int) -> bool:
    """Whether ``log[i]`` is a shared write with a ttl that the log's clock passes before the key is rewritten."""
    write = log[i].event
    if not (log[i].accepted and isinstance(write, SharedWritten) and write.value is not None and write.ttl_s):
        return False
    expiry = log[i].at + timedelta(seconds=write.ttl_s)
    for later in log[i + 1 :]:
        if later.at >= expiry:
            return True
        e = later.event
        if later.accepted and isinstance(e, SharedWritten) and (e.namespace, e.key) == (write.namespace, write.key):
            return False
    return False


def features(log: Sequence[AuditRecord], tables: Dump) -> set[str]:
    """What a log exercised, to show the property is not passing on trivial logs."""
    found = set()
    kinds = {type(r.event).__name__ for r in log if r.accepted and r.event is not None}
    found |= {f"accepted {k}" for k in kinds}
    if any(not r.accepted for r in log):
        found.add("rejections")
    if any(row[7] > 0 for row in tables["memory_entries"]):  # rolled
        found.add("list rolled into a summary")
    if any(expires_mid_log(log, i) for i in range(len(log))):
        found.add("shared key expired")
    if any(row[7] for row in tables["checkpoints"]):  # restores
        found.add("checkpoint restored")
    if any(r.code == "budget_exceeded" for r in log):
        found.add("budget exceeded")
    if any(row[8] for row in tables["tasks"]):  # parent_task_id
        found.add("subtask")
    return found


async def check_scenario(log: list[AuditRecord], plan: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        whole = await project_whole(Path(tmp) / "whole.db", log)
        assert whole["tracking"] == [("audit", len(log))]
        assert [row[0] for row in whole["audit_index"]] == list(range(1, len(log) + 1))
        assert {(row[0], row[1]) for row in whole["shared"]} == shared_model(log)

        split = await project_plan(Path(tmp) / "split.db", log, plan)
        assert split == whole

        if any(not r.accepted for r in log):
            quiet = await project_whole(Path(tmp) / "quiet.db", neutralised(log))
            assert {t: rows for t, rows in quiet.items() if t != "audit_index"} == {
                t: rows for t, rows in whole.items() if t != "audit_index"
            }, "a rejected record changed a projection"
    for name in sorted(features(log, whole)):
        event(name)
    event(f"batches: {min(len(plan), 10)}{'+' if len(plan) >= 10 else ''}")
    event(f"records: {len(log) // 20 * 20}-{len(log) // 20 * 20 + 19}")


@settings(
    max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_batches_restarts_crashes_and_redelivery_never_change_the_projection(
    scenario: tuple[list[AuditRecord], list[Step]],
) -> None:
    log, plan = scenario
    asyncio.run(check_scenario(log, plan))


# -- plain tests ---------------------------------------------------------------------------


async def test_applying_the_whole_log_again_changes_nothing(tmp_path: Path) -> None:
    for seed in range(5):
        log = build_log(RandomPicker(seed), 60)
        path = tmp_path / f"{seed}.db"
        first = await project_whole(path, log)
        db = await dbmod.open_db(path, CAP)
        try:
            assert await apply_batch(db, log, await dbmod.position(db)) == len(log)
        finally:
            await db.close()
        assert await dump_of(path) == first
        assert first["tracking"] == [("audit", len(log))]


def test_the_generated_logs_exercise_every_feature() -> None:
    """The log builder can make every kind of record and situation the property relies on."""

    async def run() -> set[str]:
        seen: set[str] = set()
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(20):
                log = build_log(RandomPicker(seed), 45)
                seen |= features(log, await project_whole(Path(tmp) / f"{seed}.db", log))
        return seen

    seen = asyncio.run(run())
    kinds = {t.__name__ for t in (*TASK_EVENTS, *AGENT_EVENTS, *MEMORY_EVENTS, SharedWritten)}
    assert {f"accepted {k}" for k in kinds} <= seen
    assert {"rejections", "list rolled into a summary", "shared key expired", "checkpoint restored",
            "budget exceeded", "subtask"} <= seen


@pytest.mark.parametrize("batch_size", [1, 3, 100])
async def test_a_list_over_the_cap_rolls_into_one_summary(tmp_path: Path, batch_size: int) -> None:
    appends = CAP + 7
    log: list[AuditRecord] = []
    for i in range(appends):
        seq = len(log) + 1
        log.append(AuditRecord(
            seq=seq, at=T0 + timedelta(seconds=seq), verdict="accepted", code="ok", reason="", principal="agent-a1",
            kind="memory_written", key="a1", msg_id=f"m{seq}", ingress_seq=seq, delivery=1,
            event=MemoryWritten(id=f"m{seq}", agent="a1", section="observation", value={"i": i}),
        ))
        if i == 1:  # a reasoning entry in between: another list, not counted
            seq += 1
            log.append(AuditRecord(
                seq=seq, at=T0 + timedelta(seconds=seq), verdict="accepted", code="ok", reason="",
                principal="agent-a1", kind="memory_written", key="a1", msg_id=f"m{seq}", ingress_seq=seq, delivery=1,
                event=MemoryWritten(id=f"m{seq}", agent="a1", section="reasoning", value="hmm"),
            ))
    db = await dbmod.open_db(tmp_path / "p.db", CAP)
    try:
        for i in range(0, len(log), batch_size):
            await apply_batch(db, log[i : i + batch_size], await dbmod.position(db))
        async with db.execute(
            "SELECT n, seq, first_seq, rolled, value FROM memory_entries WHERE agent = 'a1' AND section = 'observation'"
            " ORDER BY n"
        ) as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
        async with db.execute("SELECT observation_first, observation_next FROM memory WHERE agent = 'a1'") as cur:
            first, next_ = tuple(await cur.fetchone())  # type: ignore[arg-type]
    finally:
        await db.close()
    observation_seqs = [r.seq for r in log if isinstance(r.event, MemoryWritten) and r.event.section == "observation"]
    summaries = [r for r in rows if r[3] > 0]
    plain = [r for r in rows if r[3] == 0]
    assert len(summaries) == 1
    [(n, seq, first_seq, rolled, value)] = summaries
    assert rolled + len(plain) == appends
    assert value is None and n == first == rows[0][0]
    assert first_seq == observation_seqs[0] and seq == observation_seqs[rolled - 1]
    assert len(rows) <= CAP and next_ == appends
    assert [r[4] for r in plain] == [f'{{"i":{i}}}' for i in range(rolled, appends)]
