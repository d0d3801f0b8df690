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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar, get_args

import aiosqlite
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ledgerbus.bus.events import (
    AGENT_EVENTS,
    MEMORY_EVENTS,
    NO_RETRY,
    PLAN_SKILL,
    TASK_EVENTS,
    AgentJoined,
    AgentLeft,
    AgentProposal,
    AnyEvent,
    Budget,
    CheckpointRestored,
    CheckpointSaved,
    Claim,
    Handoff,
    Kept,
    MemoryImage,
    MemoryWiped,
    MemoryWritten,
    PlanStep,
    PlanSubmitted,
    ProposalApproved,
    Replay,
    RetryPolicy,
    RunForked,
    SharedWritten,
    SkillUnmatched,
    TaskApproved,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDenied,
    TaskDispatched,
    TaskFailed,
    TaskProgress,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
    kind_of,
    step_task_id,
)
from ledgerbus.bus.records import ArchiveSeal, AuditRecord, Checkpoint, Retention, Verdict
from ledgerbus.projections import apply as applymod
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.apply import apply_batch
from ledgerbus.projections.db import iso

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CAP = 4  # memory_list_cap: small, so the generated logs roll lists into summaries
AGENTS = ("a1", "a2", "a3")
OPS = "cli-ops"
BOSS = "cli-boss"  # the approver
HELD_SKILL = "deploy"  # submissions of it (and plans with a step of it) are held for approval
ROUTER = "router"  # the principal of the router's own decisions
CHECKPOINT_IDS = ("c0", "c1", "c2", "c3")  # shared between agents: the key is (agent, id)
NAMESPACES = ("ns1", "ns2")
SHARED_KEYS = ("x", "y", "z")
KNOWLEDGE_KEYS = ("k1", "k2", "k3")
TTLS = (1.0, 1.0, 2.0, 2.5, 3.0, 5.0)
GAPS_US = (1_000_000, 1_000_000, 1_000_000, 500_000, 2_000_000, 1)  # time between records, microseconds
ROUTER_GAPS_US = (1, 200, 20_000)  # the router's decisions follow what led to them closely
CAPABILITIES = (("summarize",), ("search", "summarize"), ("translate.fr",))  # of plan steps named by capabilities
MATCHING_SKILLS = ("llm.chat", "echo")  # what the router finds for them when an agent has them
STEP_RETRIES = (NO_RETRY, NO_RETRY, RetryPolicy(max_attempts=2), RetryPolicy(max_attempts=2, backoff_s=0.5),
                RetryPolicy(max_attempts=3, backoff_s=0.5))
TERMINAL = frozenset({"completed", "failed", "denied", "cancelled", "skipped", "dead_lettered"})  # router/state.py
MAX_DEPTH = 4  # policy [delegation] max_depth (the default): levels of subtasks under a task
LISTS: tuple[Literal["observation", "reasoning"], ...] = ("observation", "observation", "reasoning")
VALUES: tuple[Any, ...] = (0, 1, -7, 2.5, True, "x", "héllo", {"a": 1}, [1, 2], {"nested": {"b": [None]}})

T = TypeVar("T")
RouterEvent = TaskDispatched | TaskRetryScheduled | TaskDeadLettered | SkillUnmatched | TaskCancelled | TaskCompleted | TaskFailed


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


class Known(NamedTuple):
    """What the router knows at some point of a log, which the projection must show then."""

    tasks: dict[str, tuple[str, str, str | None, int, str | None]]  # id: skill, status, parent, dispatches, retry_at
    proposals: dict[str, str]  # proposal id: status


def known(builder: LogBuilder) -> Known:
    return Known(
        tasks={t: (m.skill, m.status, m.parent, m.dispatch, None if m.retry_at is None else iso(m.retry_at))
               for t, m in builder.tasks.items()},
        proposals={p: "approved" if approved else "proposed" for p, approved in builder.proposals.items()},
    )


@dataclass
class TaskModel:
    """One task as router/state.py folds it (statuses are the router's and the projection's)."""

    skill: str
    submitter: str
    status: str  # awaiting_approval, waiting, unmatched, pending, running, retrying, or one of TERMINAL
    budget: int | None = None
    claimant: str = ""
    attempt: int = 0
    dispatch: int = 1  # a plain submission is its own first dispatch; a held one, a plan and a step have none yet
    tokens: int = 0
    retry: RetryPolicy = NO_RETRY
    failures: int = 0
    retry_at: datetime | None = None
    error: str = ""
    output: Any = None
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    plan: bool = False  # a plan's own task: the router runs it, no agent claims it
    step: PlanStep | None = None
    deps: tuple[str, ...] = ()  # a step's dependencies, as task ids

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def settled(self) -> bool:
        """Nothing more happens to it (a failure with retries left still waits for the router)."""
        return self.retry.max_attempts == 1 if self.status == "failed" else self.terminal

    @property
    def ended_badly(self) -> bool:
        return self.settled and self.status != "completed"

    @property
    def claimable(self) -> bool:
        return not self.plan and self.status in ("pending", "running")


@dataclass
class LogBuilder:
    pick: Picker
    records: list[AuditRecord] = field(default_factory=list)
    at: datetime = T0
    tasks: dict[str, TaskModel] = field(default_factory=dict)
    instances: dict[str, list[str]] = field(default_factory=dict)  # agent -> its instances, newest last
    checkpoints: dict[str, list[str]] = field(default_factory=dict)  # agent -> its checkpoint ids
    proposals: dict[str, bool] = field(default_factory=dict)  # skill_unmatched event id -> approved
    last_router_checkpoint: int = 0
    decisions: int = 0  # ids of the router's own events
    task_id_of_last_claim: str = ""
    truth: list[Known] = field(default_factory=list)  # what the router knows after each record
    compacted: int = 0  # tasks archives let go of (task ids count on past them)
    last: dict[str, int] = field(default_factory=dict)  # task -> seq of the last accepted record about it
    proposal_tasks: dict[str, str] = field(default_factory=dict)  # proposal id -> its task
    archived_through: int = 0

    # -- emitting ---------------------------------------------------------------------------

    def emit(
        self, principal: str, ev: AnyEvent, verdict: Verdict = "accepted", code: str = "ok", reason: str = ""
    ) -> None:
        seq = len(self.records) + 1
        ingress = principal != ROUTER  # the router's own decisions come from no INGRESS message
        self.at += timedelta(microseconds=self.pick.choice(GAPS_US if ingress else ROUTER_GAPS_US))
        self.records.append(AuditRecord(
            seq=seq, at=self.at, verdict=verdict, code=code, reason=reason, principal=principal,
            kind=kind_of(type(ev)), key=audit_key(principal, ev), msg_id=ev.id, ingress_seq=seq if ingress else 0,
            delivery=int(ingress),
            trace_id=f"tr{seq}" if ingress and isinstance(ev, TaskSubmitted | PlanSubmitted) else "", event=ev,
        ))
        if verdict == "accepted" and isinstance(ev, TASK_EVENTS):
            self.last[ev.task_id] = seq
            if isinstance(ev, PlanSubmitted):
                self.last.update((step_task_id(ev.task_id, s.id), seq) for s in ev.steps)
        self.truth.append(known(self))

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
        self.truth.append(known(self))

    def mid(self) -> str:
        return f"m{len(self.records) + 1}"

    def rid(self) -> str:
        self.decisions += 1
        return f"r{self.decisions}"

    def value(self) -> Any:
        return self.pick.choice(VALUES)

    def where(self, test: Callable[[TaskModel], bool]) -> list[str]:
        return [t for t, m in self.tasks.items() if test(m)]

    def pick_task(self, test: Callable[[TaskModel], bool]) -> str:
        """A task that passes ``test``; often one that failed before, so retries run out."""
        tasks = self.where(test)
        again = [t for t in tasks if self.tasks[t].failures]
        return self.pick.choice(again if again and self.pick.integer(0, 3) else tasks)

    # -- the router's own decisions (router/scheduler.py) -----------------------------------

    def decided(self, ev: RouterEvent) -> None:
        """Append one of the router's decisions and fold it as router/state.py does."""
        task = self.tasks[ev.task_id]
        match ev:
            case TaskDispatched():
                task.status, task.skill, task.dispatch, task.retry_at = "pending", ev.skill, ev.dispatch, None
            case TaskRetryScheduled():
                task.status, task.retry_at = "retrying", ev.not_before
            case TaskDeadLettered():
                task.status, task.error = "dead_lettered", ev.reason
            case TaskCancelled():
                task.status, task.error = "skipped" if ev.skipped else "cancelled", ev.reason
                task.retry_at = None
            case SkillUnmatched():
                task.status = "unmatched"
                self.proposals[ev.id] = False
                self.proposal_tasks[ev.id] = ev.task_id
            case TaskCompleted():
                task.status = "completed"
            case TaskFailed():
                task.status, task.error = "failed", ev.error
                task.failures += 1
        self.emit(ROUTER, ev)

    def settle(self) -> None:
        """What the router appends after a batch: decisions until nothing more follows."""
        for _ in range(100):
            decisions = self.decide()
            if not decisions:
                return
            for ev in decisions:
                self.decided(ev)
        raise AssertionError("the model's scheduler does not settle")

    def decide(self) -> list[RouterEvent]:
        """One round of Scheduler.decide, every task dirty; retries that are due and
        unmatched steps meeting a new agent are actions of their own (do_retry, do_match)."""
        out: list[RouterEvent] = []
        touched: set[str] = set()

        def add(ev: RouterEvent) -> None:
            if ev.task_id not in touched:
                touched.add(ev.task_id)
                out.append(ev)

        for task_id in sorted(self.tasks):
            task = self.tasks[task_id]
            if task_id in touched:
                continue
            parent = self.tasks[task.parent] if task.parent is not None else None
            if parent is not None and parent.ended_badly and not task.settled:
                add(TaskCancelled(id=self.rid(), task_id=task_id, reason=f"parent {task.parent} {parent.status}"))
                continue
            if task.status == "failed" and not task.settled:
                add(self.after_failure(task_id, task))
                continue
            if task.plan and task.status == "running":
                for ev in self.plan_decisions(task_id, task, touched):
                    add(ev)
            if task.ended_badly:
                for child in task.children:
                    if not self.tasks[child].settled:
                        add(TaskCancelled(id=self.rid(), task_id=child, reason=f"parent {task_id} {task.status}"))
        return out

    def after_failure(self, task_id: str, task: TaskModel) -> RouterEvent:
        if task.failures < task.retry.max_attempts:
            not_before = self.at + timedelta(seconds=task.retry.delay_s(task.failures))
            return TaskRetryScheduled(id=self.rid(), task_id=task_id, failures=task.failures, not_before=not_before)
        reason = f"failed {task.failures} of {task.retry.max_attempts} attempts; last error: {task.error}"
        return TaskDeadLettered(id=self.rid(), task_id=task_id, failures=task.failures, reason=reason)

    def plan_decisions(self, plan_id: str, plan: TaskModel, touched: set[str]) -> list[RouterEvent]:
        steps = [(cid, self.tasks[cid]) for cid in plan.children]
        for _, s in steps:
            assert s.step is not None
            if s.settled and s.status not in ("completed", "skipped") and s.step.on_failure == "fail":
                error = f"step {s.step.id} {s.status}: {s.error}"
                return [TaskFailed(id=self.rid(), task_id=plan_id, attempt=1, error=error)]
        if all(s.settled for _, s in steps):
            output = {
                "outputs": {s.step.id: s.output for _, s in steps if s.status == "completed" and s.step},
                "failed": {s.step.id: {"status": s.status, "error": s.error}
                           for _, s in steps if s.status != "completed" and s.step},
            }
            return [TaskCompleted(id=self.rid(), task_id=plan_id, attempt=1, output=output)]
        out: list[RouterEvent] = []
        ready: list[tuple[int, int, str]] = []
        for index, (cid, s) in enumerate(steps):
            if cid in touched or s.status not in ("waiting", "unmatched"):
                continue
            deps = [self.tasks[d] for d in s.deps]
            if not all(d.settled for d in deps):
                continue
            if (bad := next((d for d in deps if d.status != "completed"), None)) is not None:
                assert bad.step is not None
                out.append(TaskCancelled(id=self.rid(), task_id=cid, skipped=True,
                                         reason=f"skipped: step {bad.step.id} {bad.status}"))
                continue
            assert s.step is not None
            ready.append((-s.step.priority, index, cid))
        for _, _, cid in sorted(ready):
            s = self.tasks[cid]
            assert s.step is not None
            if s.step.skill is not None:
                out.append(TaskDispatched(id=self.rid(), task_id=cid, skill=s.step.skill, dispatch=s.dispatch + 1,
                                          attempt_base=s.attempt))
            elif s.status != "unmatched":  # an unmatched step waits for a new agent (do_match)
                if self.pick.integer(0, 2) == 0:  # some live agent has the capabilities
                    out.append(self.matched(cid, s))
                else:
                    caps = list(s.step.capabilities)
                    name = "-".join(sorted(caps)).replace(".", "-") + "-agent"
                    proposal = AgentProposal(name=name, skills=["llm.chat"], capabilities=sorted(caps),
                                             prompt=f"You are an agent that can {', '.join(caps)}.")
                    out.append(SkillUnmatched(id=self.rid(), task_id=cid, capabilities=caps, proposal=proposal))
        return out

    def matched(self, task_id: str, task: TaskModel) -> TaskDispatched:
        return TaskDispatched(id=self.rid(), task_id=task_id, skill=self.pick.choice(MATCHING_SKILLS),
                              dispatch=task.dispatch + 1, attempt_base=task.attempt, reason="matched",
                              score=self.pick.choice((1.0, 0.5, 0.3333)))

    # -- what can happen next --------------------------------------------------------------

    def step(self) -> None:
        running = self.where(lambda m: m.claimable and m.status == "running")
        actions = ["memory", "session", "session", "burst", "shared", "shared", "reject", "reject", "join", "submit",
                   "submit", "save", "rollback", "wipe", "router_checkpoint", "plan", "plan"]
        if any(self.instances.values()):
            actions.append("leave")
        if any(m.claimable for m in self.tasks.values()):
            actions += ["start", "start", "work", "work", "quick", "quick"]
        if running:
            actions += ["report"] * 5 + ["subtask"]
        if any(m.status == "awaiting_approval" for m in self.tasks.values()):
            actions.append("decide")
        if any(self.checkpoints.values()):
            actions += ["restore", "restore"]
        if any(not m.settled for m in self.tasks.values()):
            actions.append("cancel")
        if any(m.status == "retrying" for m in self.tasks.values()):
            actions.append("retry")
        if any(m.claimable for m in self.tasks.values()):
            actions.append("max_deliver")
        if any(m.status == "unmatched" for m in self.tasks.values()):
            actions.append("match")
        if not all(self.proposals.values()):
            actions.append("approve_proposal")
        if self.archived_through < len(self.records):
            actions += ["archive", "archive"]
        getattr(self, f"do_{self.pick.choice(actions)}")()
        # The router decides after each batch of INGRESS messages: mostly right away here,
        # sometimes only after the next message.
        if self.pick.integer(0, 3):
            self.settle()
            # and its timers wake it when a retry is due
            for task_id in self.where(lambda m: m.status == "retrying" and m.retry_at <= self.at):  # type: ignore[operator]
                if self.pick.integer(0, 2):
                    self.retry(task_id)

    def do_join(self) -> None:
        agent = self.pick.choice(AGENTS)
        self.join(agent, self.pick.choice((["echo"], ["echo", HELD_SKILL], [HELD_SKILL])), {})

    def join(self, agent: str, skills: list[str], capabilities: dict[str, list[str]]) -> None:
        instance = f"{agent}-i{len(self.records)}"
        self.instances.setdefault(agent, []).append(instance)
        self.emit(f"agent-{agent}", AgentJoined(id=self.mid(), instance=instance, skills=skills,
                                                concurrency=self.pick.integer(1, 3), capabilities=capabilities))

    def do_leave(self) -> None:
        agent = self.pick.choice([a for a in AGENTS if self.instances.get(a)])
        # The newest instance (the agent goes offline) or an older replica (it stays online).
        instance = self.pick.choice(self.instances[agent][::-1])
        self.emit(f"agent-{agent}", AgentLeft(id=self.mid(), instance=instance, reason="drained"))

    def new_task_id(self) -> str:
        return f"t{len(self.tasks) + self.compacted}"

    def _submit(self, principal: str, parent: str | None) -> str:
        task_id = self.new_task_id()
        skill = self.pick.choice(("echo", "echo", HELD_SKILL))
        budget = self.pick.choice((None, 20, 40))
        retry = self.pick.choice((None, RetryPolicy(max_attempts=2, backoff_s=0.5)))
        held = skill == HELD_SKILL
        self.tasks[task_id] = TaskModel(skill=skill, submitter=principal, dispatch=0 if held else 1,
                                        status="awaiting_approval" if held else "pending", budget=budget,
                                        retry=retry or NO_RETRY, parent=parent)
        if parent is not None:
            self.tasks[parent].children.append(task_id)
        self.emit(principal, TaskSubmitted(
            id=self.mid(), task_id=task_id, skill=skill, input={"n": len(self.records), "v": self.value()},
            timeout_s=self.pick.choice((30.0, 300.0)), budget=None if budget is None else Budget(tokens=budget),
            parent_task_id=parent, retry=retry,
        ), code="approval_requested" if held else "ok")
        return task_id

    def do_submit(self) -> None:
        self._submit(OPS, None)
        if self.pick.integer(0, 5) == 0:  # a fork's subtask that is not run again: completed at once
            task_id = self.new_task_id()
            output = self.value()
            self.tasks[task_id] = TaskModel(skill="echo", submitter=OPS, dispatch=0, status="completed",
                                            output=output)
            self.emit(OPS, TaskSubmitted(id=self.mid(), task_id=task_id, skill="echo", input={},
                                         replay=Replay(recording="0" * 64),
                                         kept=Kept(source_task_id=f"src-{task_id}", output=output)))

    def depth(self, task_id: str) -> int:
        """How many tasks are above ``task_id`` (a subtask of it would be one deeper)."""
        parent = self.tasks[task_id].parent
        return 0 if parent is None else 1 + self.depth(parent)

    def do_subtask(self) -> None:
        """The claimant of a running task hands part of it on (router/checks/plan.py: delegation)."""
        parents = self.where(lambda m: m.claimable and m.status == "running")
        parents = [t for t in parents if self.depth(t) < MAX_DEPTH]
        if parents:
            parent = self.pick.choice(parents)
            task_id = self._submit(self.tasks[parent].claimant, parent)
            if self.pick.choice((True, False)):  # handed over (ctx.handoff): the router records it
                self.emit(ROUTER, Handoff(id=self.rid(), task_id=task_id, from_task=parent,
                                          from_role="writer", to_role="reviewer"))

    def do_plan(self) -> None:
        """A plan of one to four steps, each depending on some earlier ones (so a DAG)."""
        plan_id = self.new_task_id()
        steps = []
        for i in range(self.pick.integer(1, 4)):
            by_capabilities = self.pick.integer(0, 4) == 0
            steps.append(PlanStep(
                id=f"s{i}", skill=None if by_capabilities else self.pick.choice(("echo",) * 9 + (HELD_SKILL,)),
                capabilities=list(self.pick.choice(CAPABILITIES)) if by_capabilities else [],
                input={"i": i, "v": self.value()}, deps=[f"s{j}" for j in range(i) if self.pick.integer(0, 1)],
                priority=self.pick.choice((5, 5, 1, 9)), timeout_s=self.pick.choice((30.0, 300.0)),
                retry=self.pick.choice(STEP_RETRIES), on_failure=self.pick.choice(("fail", "continue", "continue")),
            ))
        held = any(s.skill == HELD_SKILL for s in steps)  # one dangerous step holds the whole plan
        children = [step_task_id(plan_id, s.id) for s in steps]
        # A fork (agentctl fork): its record, the memory it restores, then a plan whose steps
        # done by the fork point are kept, completed with their outputs.
        forked = self.pick.integer(0, 3) == 0
        kept = ({s.id: Kept(source_task_id=f"src-{s.id}", output=self.value()) for s in steps
                 if self.pick.integer(0, 1)} if forked else {})
        if forked:
            agent = self.pick.choice(AGENTS)
            cid = f"fork-{plan_id}"
            self.checkpoints.setdefault(agent, []).append(cid)
            self.emit(OPS, CheckpointSaved(id=self.mid(), agent=agent, checkpoint_id=cid, label="as at the fork point",
                                           memory=MemoryImage(role=self.value(), knowledge={"k": {"value": 1, "core": True}},
                                                              observation=[self.value()], reasoning=[])))
            self.emit(OPS, CheckpointRestored(id=self.mid(), agent=agent, checkpoint_id=cid))
            self.emit(OPS, RunForked(id=self.mid(), task_id=plan_id, source_task_id=f"src-{plan_id}", at_seq=1,
                                     recording="0" * 64, kept=[k.source_task_id for k in kept.values()],
                                     restored=[agent]))
        self.tasks[plan_id] = TaskModel(skill=PLAN_SKILL, submitter=OPS, dispatch=0, plan=True, children=children,
                                        status="awaiting_approval" if held else "running")
        for s, child in zip(steps, children, strict=True):
            self.tasks[child] = TaskModel(skill=s.skill or "", submitter=OPS, status="waiting", dispatch=0,
                                          retry=s.retry, parent=plan_id, step=s,
                                          deps=tuple(step_task_id(plan_id, d) for d in s.deps))
            if s.id in kept:
                self.tasks[child].status, self.tasks[child].output = "completed", kept[s.id].output
        self.emit(OPS, PlanSubmitted(id=self.mid(), task_id=plan_id, steps=steps,
                                     name=self.pick.choice(("", "nightly")),
                                     replay=Replay(recording="0" * 64) if forked else None, kept=kept),
                  code="approval_requested" if held else "ok")

    def do_decide(self) -> None:
        task_id = self.pick.choice(self.where(lambda m: m.status == "awaiting_approval"))
        task = self.tasks[task_id]
        reason = self.pick.choice(("", "looks fine", "too risky"))
        if self.pick.choice((True, False)):
            task.status = "running" if task.plan else "pending"
            task.dispatch = 0 if task.plan else 1
            self.emit(BOSS, TaskApproved(id=self.mid(), task_id=task_id, reason=reason))
        else:
            task.status = "denied"
            self.emit(BOSS, TaskDenied(id=self.mid(), task_id=task_id, reason=reason))

    def do_cancel(self) -> None:
        """An operator (or the agent that submitted it) cancels a task that has not ended."""
        task_id = self.pick.choice(self.where(lambda m: not m.settled))
        task = self.tasks[task_id]
        who = self.pick.choice((OPS, BOSS, *[task.submitter] * task.submitter.startswith("agent-")))
        task.status, task.error, task.retry_at = "cancelled", self.pick.choice(("", "no longer needed")), None
        self.emit(who, TaskCancelled(id=self.mid(), task_id=task_id, reason=task.error))

    def do_retry(self) -> None:
        """Nothing else happens until a retry falls due."""
        self.settle()  # the router looks at everything that is dirty when a timer fires
        retrying = self.where(lambda m: m.status == "retrying")
        if retrying:
            self.retry(self.pick.choice(retrying))

    def retry(self, task_id: str) -> None:
        """The router dispatches a task again when its retry is due."""
        task = self.tasks[task_id]
        assert task.retry_at is not None
        self.at = max(self.at, task.retry_at)
        self.decided(TaskDispatched(id=self.rid(), task_id=task_id, skill=task.skill, dispatch=task.dispatch + 1,
                                    attempt_base=task.attempt, reason="retry"))

    def do_max_deliver(self) -> None:
        """Every claimant of a task's work item died or hung: JetStream gave up redelivering
        it, and the router dead-letters the task (router.app.Router._dead_letters)."""
        self.settle()
        tasks = self.where(lambda m: m.claimable)
        if tasks:
            task_id = self.pick.choice(tasks)
            task = self.tasks[task_id]
            reason = f"no result after 5 deliveries (MaxDeliver); last claim by {task.claimant or 'nobody'}"
            self.decided(TaskDeadLettered(id=self.rid(), task_id=task_id, failures=task.failures, reason=reason))

    def do_match(self) -> None:
        """An agent with the capabilities an unmatched step needs comes up."""
        self.settle()
        unmatched = self.where(lambda m: m.status == "unmatched")
        if not unmatched:
            return
        task_id = self.pick.choice(unmatched)
        task = self.tasks[task_id]
        assert task.step is not None
        if self.pick.choice((True, False)):  # it announces itself (the router goes by heartbeats)
            self.join(self.pick.choice(AGENTS), ["llm.chat"], {"llm.chat": list(task.step.capabilities)})
        self.decided(self.matched(task_id, task))

    def do_approve_proposal(self) -> None:
        proposal_id = self.pick.choice([p for p, approved in self.proposals.items() if not approved])
        self.proposals[proposal_id] = True
        self.emit(self.pick.choice((OPS, BOSS)), ProposalApproved(
            id=self.mid(), proposal_id=proposal_id, profile=self.pick.choice(("helper", "summarizer"))))

    def do_work(self) -> None:
        """A quick run: a claim, and its result soon after (often in the same batch)."""
        self.do_start()
        while self.pick.integer(0, 2) == 0:
            self.report(self.task_id_of_last_claim, ("progress", "usage"))
        self.report(self.task_id_of_last_claim, ("usage", "complete", "fail"))

    def do_quick(self) -> None:
        """A task that finished before its claim was sent: one result carrying the claim
        (agents/runtime.py ``claim_first = False``), from pending or over a lapsed claim."""
        task_id = self.pick_task(lambda m: m.claimable)
        task = self.tasks[task_id]
        task.claimant = f"agent-{self.pick.choice(AGENTS)}"
        task.attempt += self.pick.integer(1, 2)
        claim = Claim(dispatch=task.dispatch, token=f"sha256:{task_id}")
        if self.pick.integer(0, 2):
            task.status, task.output = "completed", self.pick.choice((None, *VALUES))
            self.emit(task.claimant, TaskCompleted(id=self.mid(), task_id=task_id, attempt=task.attempt,
                                                   output=task.output, claim=claim))
        else:
            task.status, task.error = "failed", "quick failure"
            task.failures += 1
            self.emit(task.claimant, TaskFailed(id=self.mid(), task_id=task_id, attempt=task.attempt,
                                                error=task.error, claim=claim))

    def do_start(self) -> None:
        task_id = self.task_id_of_last_claim = self.pick_task(lambda m: m.claimable)
        task = self.tasks[task_id]
        agent = self.pick.choice(AGENTS)  # a redelivery may go to another agent
        task.status, task.claimant = "running", f"agent-{agent}"
        task.attempt += self.pick.integer(1, 2)  # claims count on across dispatches
        self.emit(task.claimant, TaskStarted(id=self.mid(), task_id=task_id, attempt=task.attempt,
                                             dispatch=task.dispatch))

    def do_report(self) -> None:
        task_id = self.pick_task(lambda m: m.claimable and m.status == "running")
        self.report(task_id, ("progress", "usage", "usage", "complete", "complete", "fail", "fail"))

    def report(self, task_id: str, outcomes: Sequence[str]) -> None:
        task = self.tasks[task_id]
        if task.status != "running":  # over budget
            return
        who, attempt = task.claimant, task.attempt
        match self.pick.choice((*outcomes, *["fail"] * bool(task.failures))):  # what failed tends to fail again
            case "progress":
                fraction = self.pick.choice((None, 0.0, 0.5, 1.0))
                self.emit(who, TaskProgress(id=self.mid(), task_id=task_id, attempt=attempt,
                                            message=self.pick.choice(("", "working", "almost")), fraction=fraction))
            case "usage":
                tokens_in, tokens_out = self.pick.integer(0, 25), self.pick.integer(0, 10)
                task.tokens += tokens_in + tokens_out
                code, reason = "ok", ""
                if task.budget is not None and task.tokens > task.budget:
                    code, reason = "budget_exceeded", f"{task.tokens} tokens used of a budget of {task.budget}"
                    task.status, task.retry, task.error = "failed", NO_RETRY, reason
                self.emit(who, TaskUsage(id=self.mid(), task_id=task_id, attempt=attempt, tokens_in=tokens_in,
                                         tokens_out=tokens_out, cost_usd=self.pick.choice((0.0, 0.25, 0.001)),
                                         provider="p", model="m"), code=code, reason=reason)
            case "complete":
                task.status, task.output = "completed", self.pick.choice((None, *VALUES))
                self.emit(who, TaskCompleted(id=self.mid(), task_id=task_id, attempt=attempt, output=task.output))
            case _:
                task.status, task.error = "failed", self.pick.choice(("boom", "flaky"))
                task.failures += 1
                self.emit(who, TaskFailed(id=self.mid(), task_id=task_id, attempt=attempt, error=task.error))

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

    def do_archive(self) -> None:
        """The router archives records up to a cut (after the last one) and appends its
        ``audit_archived`` record: every task tree that is settled, with no accepted record
        after the cut, leaves what it knows (docs/architecture.md, step 5 of an archiving
        round). Worked out here from the model, apart from bus/compaction.py."""
        self.settle()
        # Mostly everything so far (the most it can let go of), else anywhere after the last cut.
        through = max(self.pick.integer(self.archived_through + 1, len(self.records)),
                      len(self.records) * self.pick.integer(0, 1))

        def root(task_id: str) -> str:
            parent = self.tasks[task_id].parent
            return task_id if parent is None else root(parent)

        open_roots = {root(t) for t, m in self.tasks.items() if not m.settled or self.last[t] > through}
        gone = {t for t in self.tasks if root(t) not in open_roots}
        for task_id in gone:
            del self.tasks[task_id]
        for proposal_id in [p for p, t in self.proposal_tasks.items() if t in gone]:
            self.proposals.pop(proposal_id, None)
        self.compacted += len(gone)
        self.archived_through = through
        seq = len(self.records) + 1
        self.at += timedelta(microseconds=self.pick.choice(ROUTER_GAPS_US))
        first = self.records[0]
        seal = ArchiveSeal(file=f"audit-{1:012d}-{through:012d}.jsonl.gz", first_seq=1, last_seq=through,
                           first_at=first.at, last_at=self.records[through - 1].at, prev_hash="0" * 64,
                           last_hash="0" * 64, sha256="0" * 64, bytes=1, key_id="k", signature="s")
        self.records.append(AuditRecord(
            seq=seq, at=self.at, verdict="accepted", code="ok", reason="", principal=ROUTER, kind="audit_archived",
            key="router", msg_id="", ingress_seq=0, delivery=0,
            retention=Retention(action="archived", rule="audit_max_age 7d", through_seq=through, segments=[seal]),
        ))
        self.truth.append(known(self))

    def do_reject(self) -> None:
        """A message the router refuses: it must change nothing but the audit index."""
        kinds = ["unknown_task", "not_memory_owner", "unknown_checkpoint", "bad_plan", "bad_cancel", "unknown_proposal"]
        running = self.where(lambda m: m.claimable and m.status == "running")
        claimable = self.where(lambda m: m.claimable)
        claimed = self.where(lambda m: m.claimable and m.attempt > 0)
        unclaimable = self.where(lambda m: m.status in ("waiting", "unmatched", "retrying")
                                 or (m.plan and m.status == "running"))
        terminal = self.where(lambda m: m.terminal)
        settled = self.where(lambda m: m.settled)
        open_ = self.where(lambda m: not m.settled)
        held = self.where(lambda m: m.status == "awaiting_approval")
        held_by_ops = [t for t in held if self.tasks[t].submitter == OPS]
        pending = self.where(lambda m: m.status == "pending")
        approved = [p for p, done in self.proposals.items() if done]
        saved = [a for a in AGENTS if self.checkpoints.get(a)]
        kinds += ["not_claimant"] * bool(running) + ["task_terminal"] * bool(terminal)
        kinds += ["stale_dispatch"] * bool(claimable) + ["stale_attempt"] * bool(claimed)
        kinds += ["not_dispatched"] * bool(unclaimable) + ["cancel_settled"] * bool(settled)
        kinds += ["not_submitter", "router_only"] * bool(open_) + ["already_approved"] * bool(approved)
        kinds += ["duplicate_task"] * bool(self.tasks) + ["awaiting_approval"] * bool(held)
        kinds += ["self_approval"] * bool(held_by_ops) + ["subtask_of_ended"] * bool(settled)
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
            case "stale_dispatch":  # a redelivery of an earlier dispatch, or a claim of one not made yet
                task_id = self.pick.choice(claimable)
                task = self.tasks[task_id]
                dispatch = task.dispatch - 1 if task.dispatch > 1 else task.dispatch + 1
                self.reject(f"agent-{agent}", TaskStarted(id=self.mid(), task_id=task_id, attempt=task.attempt + 1,
                                                          dispatch=dispatch), "stale_dispatch")
            case "stale_attempt":
                task_id = self.pick.choice(claimed)
                task = self.tasks[task_id]
                self.reject(f"agent-{agent}", TaskStarted(id=self.mid(), task_id=task_id, dispatch=task.dispatch,
                                                          attempt=self.pick.integer(1, task.attempt)), "stale_attempt")
            case "not_dispatched":  # a plan, or a step waiting for its dependencies, a match or a retry
                task_id = self.pick.choice(unclaimable)
                task = self.tasks[task_id]
                self.reject(f"agent-{agent}", TaskStarted(id=self.mid(), task_id=task_id, attempt=task.attempt + 1,
                                                          dispatch=max(task.dispatch, 1)), "not_dispatched")
            case "cancel_settled":
                task_id = self.pick.choice(settled)
                self.reject(OPS, TaskCancelled(id=self.mid(), task_id=task_id, reason="too late"), "task_terminal")
            case "not_submitter":
                task_id = self.pick.choice(open_)
                who = self.pick.choice([f"agent-{a}" for a in AGENTS if f"agent-{a}" != self.tasks[task_id].submitter])
                self.reject(who, TaskCancelled(id=self.mid(), task_id=task_id), "not_submitter")
            case "bad_cancel":  # only the router skips steps
                task_id = self.pick.choice([*self.tasks, "nope"])
                self.reject(OPS, TaskCancelled(id=self.mid(), task_id=task_id, skipped=True), "bad_cancel")
            case "router_only":  # nobody sends the router's decisions
                task_id = self.pick.choice(open_)
                forged: tuple[AnyEvent, ...] = (
                    TaskDispatched(id=self.mid(), task_id=task_id, skill="echo", dispatch=7),
                    TaskRetryScheduled(id=self.mid(), task_id=task_id, failures=1, not_before=self.at),
                    TaskDeadLettered(id=self.mid(), task_id=task_id, failures=1, reason="forged"),
                    SkillUnmatched(id=self.mid(), task_id=task_id, capabilities=["search"],
                                   proposal=AgentProposal(name="forged", skills=["echo"])),
                )
                self.reject(f"agent-{agent}", self.pick.choice(forged), "kind_not_allowed")
            case "bad_plan":
                bad = PlanSubmitted(id=self.mid(), task_id=f"bad{len(self.records)}", steps=[
                    PlanStep(id="a", skill="echo", deps=["b"]), PlanStep(id="b", skill="echo", deps=["a"]),
                ])
                self.reject(OPS, bad, "bad_plan")
            case "subtask_of_ended":
                parent = self.pick.choice(settled)
                late_subtask = TaskSubmitted(id=self.mid(), task_id=f"late{len(self.records)}", skill="echo",
                                             parent_task_id=parent)
                self.reject(self.tasks[parent].claimant or OPS, late_subtask, "task_terminal")
            case "unknown_proposal":
                self.reject(OPS, ProposalApproved(id=self.mid(), proposal_id="nope", profile="x"), "unknown_proposal")
            case "already_approved":
                proposal = self.pick.choice(approved)
                self.reject(BOSS, ProposalApproved(id=self.mid(), proposal_id=proposal, profile="again"),
                            "already_approved")
            case "duplicate_task":
                task_id = self.pick.choice(list(self.tasks))
                if self.pick.choice((True, False)):
                    dup: AnyEvent = TaskSubmitted(id=self.mid(), task_id=task_id, skill="other", input={"dup": True})
                else:
                    dup = PlanSubmitted(id=self.mid(), task_id=task_id, steps=[PlanStep(id="x", skill="echo")])
                self.reject(OPS, dup, "duplicate_task")
            case "awaiting_approval":
                task_id = self.pick.choice(held)
                start = TaskStarted(id=self.mid(), task_id=task_id, attempt=1)
                self.reject(f"agent-{agent}", start, "awaiting_approval")
            case "self_approval":
                task_id = self.pick.choice(held_by_ops)
                self.reject(OPS, TaskApproved(id=self.mid(), task_id=task_id), "self_approval")
            case "not_awaiting_approval":
                task_id = self.pick.choice(pending)
                self.reject(BOSS, TaskDenied(id=self.mid(), task_id=task_id, reason="late"), "not_awaiting_approval")
            case _:
                owner = self.pick.choice(saved)
                self.reject(OPS, CheckpointSaved(id=self.mid(), agent=owner, checkpoint_id=self.checkpoints[owner][0],
                                                 state={"overwrite": True}), "duplicate_checkpoint")


def created_ids(record: AuditRecord) -> list[str]:
    """The tasks a record creates (a plan creates its steps too)."""
    match record.event:
        case TaskSubmitted(task_id=task_id):
            return [task_id]
        case PlanSubmitted(task_id=plan_id, steps=steps):
            return [plan_id, *(step_task_id(plan_id, s.id) for s in steps)]
        case _:
            return []


def audit_key(principal: str, ev: AnyEvent) -> str:
    """The audit key the router gives a record (see router.records.record_for and router.app._router_record)."""
    if isinstance(ev, TASK_EVENTS):
        return ev.task_id
    if isinstance(ev, AGENT_EVENTS):
        return principal.partition("-")[2]
    if isinstance(ev, MEMORY_EVENTS):
        return ev.agent
    if isinstance(ev, SharedWritten):
        return ev.namespace
    if isinstance(ev, ProposalApproved):
        return ev.proposal_id
    return "_"


def build(pick: Picker, steps: int) -> LogBuilder:
    """A builder that has made a valid log of about ``steps`` messages (bursts and the
    router's decisions add records); its model says what the router knows at the end."""
    builder = LogBuilder(pick)
    for _ in range(steps):
        builder.step()
    if not builder.records:
        builder.router_checkpoint()
    return builder


def build_log(pick: Picker, steps: int) -> list[AuditRecord]:
    """A valid log of about ``steps`` messages."""
    return build(pick, steps).records


async def projected(db: aiosqlite.Connection) -> Known:
    """What the tasks and proposals tables say the router knows."""
    async with db.execute("SELECT task_id, skill, status, parent_task_id, dispatches, retry_at FROM tasks") as cur:
        tasks = {row[0]: tuple(row[1:]) for row in await cur.fetchall()}
    async with db.execute("SELECT proposal_id, status FROM proposals") as cur:
        proposals = {row[0]: row[1] for row in await cur.fetchall()}
    return Known(tasks, proposals)  # type: ignore[arg-type]


async def projected_at(path: Path) -> Known:
    db = await dbmod.open_db(path, CAP)
    try:
        return await projected(db)
    finally:
        await db.close()


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
def scenarios(draw: st.DrawFn) -> tuple[list[AuditRecord], list[Step], list[Known]]:
    builder = build(DrawPicker(draw), draw(st.integers(1, 45)))
    return builder.records, draw(plans(len(builder.records))), builder.truth


class Killed(Exception):
    """The projector died in the middle of a batch."""


async def _die(batch: object, records: Sequence[AuditRecord]) -> None:
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


async def project_plan(path: Path, log: Sequence[AuditRecord], plan: Sequence[Step], truth: Sequence[Known]) -> Dump:
    """Apply ``log`` as ``plan`` says, keeping the position in memory as the projector does.

    After every batch the tables must equal those of a database fed the same records one
    at a time (the other extreme of batching), and show the tasks as the router knows
    them then (``truth``), so a difference is caught where it arises, before later
    records can hide it.
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
            assert await projected(db) == truth[step.end - 1], f"the router knows otherwise after record {step.end}"
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
    created = {t for r in log if r.accepted for t in created_ids(r)}
    if created - {row[0] for row in tables["tasks"]}:
        found.add("tasks compacted by an archive")
    cut = max((r.retention.through_seq for r in log if r.retention is not None), default=0)
    if any(row[5] in TERMINAL - {"failed"} and row[-1] <= cut for row in tables["tasks"]):  # status, updated_seq
        found.add("settled task kept with its open tree")
    unmatched = set()
    for r in log:
        if not r.accepted:
            continue
        match r.event:
            case TaskSubmitted(kept=Kept()):
                found.add("fork's kept subtask")
            case PlanSubmitted(kept=kept) if kept:
                found.add("fork's kept plan step")
            case CheckpointSaved(memory=MemoryImage()):
                found.add("checkpoint of a given memory")
            case PlanSubmitted() if r.code == "approval_requested":
                found.add("plan held for approval")
            case TaskCompleted() | TaskFailed() if r.principal == ROUTER:
                found.add(f"plan {'completed' if isinstance(r.event, TaskCompleted) else 'failed'}")
            case TaskCancelled(skipped=True):
                found.add("step skipped")
            case TaskCancelled():
                found.add("cancelled by the router" if r.principal == ROUTER else "cancelled by a principal")
            case TaskDispatched(reason="retry"):
                found.add("dispatched again to retry")
            case TaskDispatched(reason="matched", task_id=task_id) if task_id in unmatched:
                found.add("matched after no match")
            case SkillUnmatched(task_id=task_id):
                unmatched.add(task_id)
            case TaskStarted(dispatch=dispatch) if dispatch > 1:
                found.add("claim of a later dispatch")
            case TaskDeadLettered(failures=failures):
                found.add("retries spent" if failures and r.event.reason.startswith("failed") else "max deliveries")
            case _:
                pass
    return found


async def check_scenario(log: list[AuditRecord], plan: list[Step], truth: list[Known]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        whole = await project_whole(Path(tmp) / "whole.db", log)
        assert whole["tracking"] == [("audit", len(log))]
        # What the live log still holds: everything after the last archive's cut.
        cut = max((r.retention.through_seq for r in log if r.retention is not None), default=0)
        assert [row[0] for row in whole["audit_index"]] == list(range(cut + 1, len(log) + 1))
        assert {(row[0], row[1]) for row in whole["shared"]} == shared_model(log)
        assert await projected_at(Path(tmp) / "whole.db") == truth[-1], "the projection disagrees with the router"

        split = await project_plan(Path(tmp) / "split.db", log, plan, truth)
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
    scenario: tuple[list[AuditRecord], list[Step], list[Known]],
) -> None:
    asyncio.run(check_scenario(*scenario))


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
    """The log builder can make every kind of record and situation the property relies on
    (and on these logs the projection shows what the router knows after every batch)."""

    async def run() -> set[str]:
        seen: set[str] = set()
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(26):
                builder = build(RandomPicker(seed), 45)
                log, sizes = builder.records, random.Random(seed)
                db = await dbmod.open_db(Path(tmp) / f"{seed}.db", CAP)
                try:
                    position = 0
                    while position < len(log):
                        end = min(len(log), position + sizes.randint(1, 8))
                        position = await apply_batch(db, log[position:end], position)
                        assert await projected(db) == builder.truth[end - 1], f"seed {seed}, after record {end}"
                    seen |= features(log, await dbmod.dump(db))
                finally:
                    await db.close()
        return seen

    seen = asyncio.run(run())
    kinds = {t.__name__ for t in get_args(AnyEvent)}  # every kind the log may hold, ProposalApproved too
    assert kinds >= {t.__name__ for t in (*TASK_EVENTS, *AGENT_EVENTS, *MEMORY_EVENTS, SharedWritten, ProposalApproved)}
    assert {f"accepted {k}" for k in kinds} <= seen
    assert {"rejections", "list rolled into a summary", "shared key expired", "checkpoint restored",
            "budget exceeded", "subtask", "plan held for approval", "plan completed", "plan failed", "step skipped",
            "cancelled by the router", "cancelled by a principal", "dispatched again to retry",
            "matched after no match", "claim of a later dispatch", "retries spent", "max deliveries",
            "tasks compacted by an archive", "settled task kept with its open tree", "fork's kept subtask",
            "fork's kept plan step", "checkpoint of a given memory"} <= seen


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
