"""The chaos harness: the whole system as subprocesses, a stream of tasks and plans, a
seeded schedule of faults, and a verdict on every id submitted.

A run is: start nats-server, two routers (a leader and a standby), the projector and three
agents; submit tasks and plans at a steady rate, each publish retried with the same
``Nats-Msg-Id`` the way a careful client does; inject the schedule's faults one after
another, each once the previous one has recovered; stop submitting; wait until every id
has settled; then classify each one and check the log and the projections. The seed and
the schedule are printed first, so that a failure replays exactly
(``LEDGERBUS_CHAOS_SEED=N``).

Outcomes, per id:

- ``ok``: the submission was acknowledged (or, unacknowledged, still reached the log) and
  the task has exactly one accepted terminal result;
- ``lost``: acknowledged, but absent from the log or never settled;
- ``duplicated``: more than one accepted completion (of the id, or of one of a plan's
  steps, which are listed by their own ids);
- ``unknown``: never acknowledged and not in the log: the client was told it failed,
  which is back-pressure, not a loss.

A task may end failed rather than completed (dead-lettered after MaxDeliver, say): it
counts as ok, with its outcome, since it has one result; what the result was is the
test's to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.archive import Archive
from ledgerbus.bus.connection import connect
from ledgerbus.bus.events import PlanStep, PlanSubmitted, TaskSubmitted, kind_of, new_id
from ledgerbus.bus.provision import provision
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from ledgerbus.router.lease import Holder
from ledgerbus.router.state import RouterState
from tests.support import Proc, Procs, agentctl, audit_records, auth_dir, server_config, suite_settings, wait_until

LEASE_S = 2.0
ACK_WAIT_S = 2.0
SLEEPERS = ("sleeper-1", "agent-a")
"""The agents running the ``sleep`` skill: long enough for a kill to land mid-skill."""

FAULTS = ("agent_kill", "agent_crash", "router_kill", "router_crash", "router_pause", "projector_crash",
          "server_kill")
ROUTER_POINTS = ("router.fetched", "router.appended", "router.dispatched")
SNAPSHOT_EVERY = 25
"""The routers' ``LEDGERBUS_SNAPSHOT_EVERY`` in a run (a run makes a few hundred records)."""
CHECKPOINT_EVERY = 20
"""The routers' ``LEDGERBUS_CHECKPOINT_EVERY``: the retention rule never cuts past the last one."""
RETENTION = """
[retention]
audit_max_age = "3s"
segment_records = 25
archive_dir = "{archive}"
archive_max_age = "0"
check_every = "1s"
"""
"""Every run archives and purges as it goes: each fault also lands on the retention rule's
rounds, and the judge and verify read archive and stream as one log."""


@dataclass(frozen=True)
class Fault:
    """One fault of a schedule: what, and how long after the previous one recovered."""

    kind: str
    after_s: float
    target: str = ""
    point: str = ""
    hit: int = 1
    hold_s: float = 0.0
    """How long a killed server stays down, or a paused router paused."""

    def __str__(self) -> str:
        what = {
            "agent_kill": f"kill -9 agent {self.target} while a skill runs",
            "agent_crash": f"agent {self.target} dies at agent.skill_done, hit {self.hit}",
            "router_kill": "kill -9 the leading router",
            "router_crash": f"the leading router dies at {self.point}, hit {self.hit}",
            "router_pause": f"SIGSTOP the leading router for {self.hold_s:.1f}s, then SIGCONT",
            "projector_crash": f"the projector dies at projector.applied, hit {self.hit}",
            "server_kill": f"kill -9 nats-server, restart it {self.hold_s:.1f}s later",
            "disk_full": f"fill the JetStream store's disk for {self.hold_s:.1f}s, free it, restart nats-server",
        }[self.kind]
        return f"+{self.after_s:.1f}s {what}"


def schedule(seed: int, count: int, kinds: tuple[str, ...] = FAULTS) -> list[Fault]:
    """``count`` faults drawn from ``kinds`` by ``seed``: the same seed, the same schedule.

    Every kind appears once before any repeats (in an order the seed picks), so a short
    schedule still covers as many kinds as it has room for.
    """
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < count:
        order += rng.sample(kinds, len(kinds))
    faults = []
    for kind in order[:count]:
        after = round(rng.uniform(0.5, 2.5), 1)
        match kind:
            case "agent_kill" | "agent_crash":
                faults.append(Fault(kind, after, target=rng.choice(SLEEPERS), hit=rng.randint(1, 3)))
            case "router_crash":
                faults.append(Fault(kind, after, point=rng.choice(ROUTER_POINTS), hit=rng.randint(1, 5)))
            case "projector_crash":
                faults.append(Fault(kind, after, hit=rng.randint(1, 4)))
            case "router_pause":
                faults.append(Fault(kind, after, hold_s=round(LEASE_S + ACK_WAIT_S + rng.uniform(0.5, 2.0), 1)))
            case "server_kill":
                faults.append(Fault(kind, after, hold_s=round(rng.uniform(0.2, 2.0), 1)))
            case "disk_full":
                faults.append(Fault(kind, after, hold_s=round(rng.uniform(2.0, 5.0), 1)))
            case _:
                faults.append(Fault(kind, after))
    return faults


@dataclass
class Submission:
    """One id the load generator submitted, and what the bus told it."""

    id: str
    kind: str
    acked: bool = False
    error: str = ""
    """Why the last publish attempt failed (empty once one succeeded)."""
    refused: int = 0
    """Publish attempts that failed before one succeeded or the client gave up."""


@dataclass
class Verdict:
    """Every submitted id, classified (see the module docstring)."""

    ok: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    """Terminal status of the ok ids: completed, failed, dead_lettered..."""

    def counts(self) -> dict[str, int]:
        return {"ok": len(self.ok), "lost": len(self.lost), "duplicated": len(self.duplicated),
                "unknown": len(self.unknown)}


def fold(records: list[AuditRecord]) -> RouterState:
    """The router's view of the log, rebuilt here: each task's status. Every task's, the
    archived ones too: the cuts (``audit_archived``) are not folded, or the tasks settled by
    then would leave the state and look lost."""
    state = RouterState()
    for record in records:
        if record.retention is None:
            state.apply(record)
    return state


def classify(submissions: list[Submission], records: list[AuditRecord]) -> Verdict:
    """Judge every submission against the log."""
    state = fold(records)
    completions = Counter(r.key for r in records if r.accepted and r.kind == "task_completed")
    verdict = Verdict()
    # Plan steps are tasks too: none may complete twice either.
    submitted = {sub.id for sub in submissions}
    verdict.duplicated += sorted(k for k, n in completions.items() if n > 1 and k not in submitted)
    for sub in submissions:
        task = state.tasks.get(sub.id)
        if completions[sub.id] > 1:
            verdict.duplicated.append(sub.id)
        elif task is not None and task.settled:
            verdict.ok.append(sub.id)
            verdict.outcomes[task.status] += 1
        elif task is None and not sub.acked:
            verdict.unknown.append(sub.id)
        else:
            verdict.lost.append(sub.id)
    return verdict


def unsettled(submissions: list[Submission], records: list[AuditRecord]) -> list[str]:
    """The ids that must still settle: acknowledged or in the log, and not settled."""
    state = fold(records)
    return [s.id for s in submissions
            if (s.acked or s.id in state.tasks) and not ((t := state.tasks.get(s.id)) and t.settled)]


class Load:
    """Submits tasks and plans at a steady rate from a seeded generator.

    Each publish is retried with the same message id until a PubAck or ``give_up_s``:
    JetStream's duplicate window (and the router's own dedup) keeps a retried submission
    that did arrive from running twice.
    """

    def __init__(self, nc: Client, rng: random.Random, rate: float = 8.0, give_up_s: float = 6.0,
                 slow_s: float = 0.0) -> None:
        self.nc = nc
        self.rng = rng
        self.slow_s = slow_s
        """If set, one sleep task in four sleeps this long instead (longer than AckWait)."""
        self.interval = 1 / rate
        self.give_up_s = give_up_s
        self.submissions: list[Submission] = []
        self.ack_times: list[float] = []
        self._n = 0

    def _next(self) -> tuple[Submission, TaskSubmitted | PlanSubmitted]:
        self._n += 1
        roll = self.rng.random()
        if roll < 0.12:
            plan_id = f"plan-{self._n}"
            steps = [PlanStep(id="nap", skill="sleep", input={"seconds": 0.3}),
                     PlanStep(id="say", skill="echo", input={"n": self._n}, deps=["nap"]),
                     PlanStep(id="also", skill="echo", input={"n": -self._n})]
            return Submission(plan_id, "plan"), PlanSubmitted(id=new_id(), task_id=plan_id, steps=steps)
        task_id = f"task-{self._n}"
        if roll < 0.5:
            seconds = round(self.rng.uniform(0.2, 1.5), 2)
            if self.slow_s and self.rng.random() < 0.25:
                return Submission(task_id, "slow"), TaskSubmitted(id=new_id(), task_id=task_id, skill="sleep",
                                                                  input={"seconds": self.slow_s}, timeout_s=60)
            return Submission(task_id, "sleep"), TaskSubmitted(id=new_id(), task_id=task_id, skill="sleep",
                                                               input={"seconds": seconds})
        return Submission(task_id, "echo"), TaskSubmitted(id=new_id(), task_id=task_id, skill="echo",
                                                          input={"n": self._n})

    async def _publish(self, sub: Submission, event: TaskSubmitted | PlanSubmitted) -> None:
        subject = subjects.ingress(subjects.principal("cli", "chaos"), kind_of(type(event)))
        data = codec.encode(event)
        js = self.nc.jetstream(timeout=2)
        deadline = time.monotonic() + self.give_up_s
        while True:
            try:
                await js.publish(subject, data, headers={subjects.HDR_MSG_ID: event.id})
                sub.acked, sub.error = True, ""
                self.ack_times.append(time.monotonic())
                return
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                sub.error = str(exc) or type(exc).__name__
                sub.refused += 1
                if time.monotonic() >= deadline:
                    return
                await asyncio.sleep(0.3)

    async def run(self, stop: asyncio.Event) -> None:
        """Submit until ``stop``; publishes in flight finish (or give up) before it returns."""
        inflight: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            sub, event = self._next()
            self.submissions.append(sub)
            task = asyncio.create_task(self._publish(sub, event))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        await asyncio.gather(*inflight)


@dataclass
class FaultResult:
    """What one injected fault did: when, and how long until the system had recovered."""

    fault: Fault
    recovered_s: float
    note: str = ""


class System:
    """The whole system as subprocesses on one nats-server, restartable piece by piece."""

    def __init__(self, tmp: Path, workspace_root: Path, store_dir: Path | None = None,
                 agent_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.agent_env = agent_env or {}
        """Added to every agent's environment (fail points armed for the whole run)."""
        self.store_dir = store_dir or tmp / "jetstream"
        self.server = NatsServer(store_dir=self.store_dir, config=server_config(tmp / "conf"))
        self.workspace_root = workspace_root
        self.settings = Settings()
        self.archive = Archive(tmp / "archive")
        self.procs: Procs | None = None
        self.routers: list[Proc] = []
        self.agents: dict[str, Proc] = {}
        self.projector: Proc | None = None
        self.admin: Client | None = None
        self.cli: Client | None = None
        self.struck = 0.0

    async def start(self) -> None:
        await self.server.start()
        assert self.server.config is not None
        self.settings = suite_settings(self.server.url, self.tmp, self.workspace_root, auth_dir(self.server.config),
                                       work_ack_wait_s=ACK_WAIT_S, ingress_ack_wait_s=ACK_WAIT_S)
        self.settings.policy_path.write_text(RETENTION.format(archive=self.archive.path))
        self.procs = Procs(self.settings, self.tmp)
        self.admin = await connect(self.settings, "admin")
        await provision(self.admin.jetstream(), self.settings)
        self.cli = await connect(self.settings.replace(user="harness-cli", password="harness-cli-pw"), "cli")
        self.routers = [await self._router("router-a"), await self._router("router-b")]
        self.projector = await self._projector()
        self.agents["echo-1"] = await self._agent("echo-1")
        for name in SLEEPERS:
            self.agents[name] = await self._agent(name)
        await self.wait_agents_joined()

    async def stop(self) -> None:
        for nc in (self.cli, self.admin):
            if nc is not None and not nc.is_closed:
                await nc.close()
        if self.procs is not None:
            await self.procs.stop_all()
        await self.server.stop()
        # Beside the processes' logs, for a failure to be read.
        (self.tmp / "nats-server.log").write_text("\n".join(self.server.log_tail) + "\n")

    # -- processes ---------------------------------------------------------------------

    async def _router(self, name: str, **env: str) -> Proc:
        assert self.procs is not None
        # Snapshots every few records: every restart and takeover of a run starts from one.
        return await self.procs.start(name, "router", LEDGERBUS_ROUTER_LEASE_S=str(LEASE_S),
                                      **{"LEDGERBUS_SNAPSHOT_EVERY": str(SNAPSHOT_EVERY),
                                         "LEDGERBUS_CHECKPOINT_EVERY": str(CHECKPOINT_EVERY), **env})

    async def _projector(self, **env: str) -> Proc:
        assert self.procs is not None
        return await self.procs.start("projector", "projector", **env)

    async def _agent(self, name: str, **env: str) -> Proc:
        assert self.procs is not None
        env = {**self.agent_env, **env}
        if name == "echo-1":
            return await self.procs.start(name, "agent", "--name", name, "--skills", "echo", "--concurrency", "4", **env)
        return await self.procs.start(name, "agent", "--name", name, "--skills", "sleep", "--concurrency", "3", **env)

    async def restart_agent(self, name: str, **env: str) -> Proc:
        await self.agents[name].stop()
        self.agents[name] = await self._agent(name, **env)
        return self.agents[name]

    async def wait_agents_joined(self) -> None:
        """Until every agent is registered in the ``agents`` bucket (heartbeating)."""
        assert self.admin is not None
        kv = await self.admin.jetstream().key_value(subjects.AGENTS_BUCKET)

        async def all_there() -> bool:
            try:
                keys = set(await kv.keys())
            except (nats.errors.Error, nats.js.errors.NoKeysError):
                return False
            return all(any(name in k for k in keys) for name in self.agents)

        await wait_until(all_there, 60, what="agents joined")

    async def leader(self) -> Proc:
        """The router whose process holds the lease (the ``leader`` key names its pid)."""
        holder = await self._holder_pid()
        for proc in self.routers:
            if proc.proc.pid == holder and proc.proc.returncode is None:
                return proc
        raise AssertionError(f"no running router holds the lease (holder pid {holder})")

    async def _holder_pid(self) -> int | None:
        assert self.admin is not None
        try:
            kv = await self.admin.jetstream(timeout=5).key_value(subjects.ROUTER_BUCKET)
            entry = await kv.get(subjects.ROUTER_LEADER_KEY)
        except (nats.errors.Error, nats.js.errors.KeyNotFoundError, TimeoutError):
            return None
        if entry.value is None or entry.operation is not None:
            return None  # deleted or purged: nobody holds it
        return msgspec.json.decode(entry.value, type=Holder).pid

    async def wait_leader(self, other_than: Proc | None = None, timeout: float = 30.0) -> Proc:
        """Until a running router other than ``other_than`` holds the lease; that router."""
        async def led() -> bool:
            pid = await self._holder_pid()
            return any(p.proc.pid == pid and p is not other_than and p.proc.returncode is None for p in self.routers)

        await wait_until(led, timeout, what="a router holding the lease")
        return await self.leader()

    # -- the log -----------------------------------------------------------------------

    async def records(self) -> list[AuditRecord]:
        """Every audit record, the archived ones first (retried while the server comes back)."""
        assert self.admin is not None
        for _ in range(30):
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                js = self.admin.jetstream(timeout=10)
                live = await audit_records(js)
                first = live[0].seq if live else (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq + 1
                archived = [codec.read_record(seq, data) for seq, data in self.archive.records(1, first - 1)]
                return archived + live
            await asyncio.sleep(1.0)
        raise AssertionError("AUDIT could not be read for 30 s")

    async def head(self) -> int:
        """AUDIT's last sequence (retried while the server comes back)."""
        assert self.admin is not None
        for _ in range(60):
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                return (await self.admin.jetstream(timeout=5).stream_info(subjects.AUDIT_STREAM)).state.last_seq
            await asyncio.sleep(0.5)
        raise AssertionError("AUDIT did not answer for 30 s")

    async def wait_head_beyond(self, seq: int, timeout: float = 60.0) -> None:
        async def moved() -> bool:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                return await self.head() > seq
            return False

        await wait_until(moved, timeout, what=f"AUDIT beyond {seq}")

    async def running_on(self, agent: str) -> list[str]:
        """The tasks the log has as claimed by ``agent`` and still running."""
        who = str(subjects.principal("agent", agent))
        state = fold(await self.records())
        return [tid for tid, t in state.tasks.items() if t.status == "running" and t.claimant == who]

    async def wait_settled(self, ids: set[str], timeout: float = 90.0) -> None:
        async def done() -> bool:
            state = fold(await self.records())
            return all((t := state.tasks.get(i)) is not None and t.settled for i in ids)

        await wait_until(done, timeout, what=f"{len(ids)} tasks settled")

    async def projector_position(self) -> int:
        from ledgerbus.projections import db as dbmod

        if not self.settings.db_path.exists():
            return 0
        db = await dbmod.open_reader(self.settings.db_path)
        try:
            return await dbmod.position(db)
        finally:
            await db.close()

    # -- faults ------------------------------------------------------------------------

    def _strike(self) -> None:
        """The fault happens now (a kill sent, a crash seen): recovery is timed from here."""
        self.struck = time.monotonic()

    async def inject(self, fault: Fault) -> FaultResult:
        """Inject ``fault`` and wait until the system has recovered from it.

        Recovery, timed from the moment of the fault: for a router, until another one
        leads and AUDIT grows again; for an agent, until every task it held has settled
        elsewhere; for the projector, until the restarted one reaches the head it
        crashed at; for nats-server, until AUDIT grows again after the restart; for a
        full disk, until AUDIT grows again once space is freed.
        """
        try:
            return await self._inject(fault)
        except TimeoutError as exc:
            # A process that went quiet says what it waits on (bus/stacks.py).
            exc.add_note(await self.dump_stacks())
            raise

    async def dump_stacks(self) -> str:
        """Ask every running process for its tasks' chains of awaits (SIGUSR1) and return
        them, one block per process, for a failure to show."""
        assert self.procs is not None
        running = [p for p in self.procs.started if p.proc.returncode is None]
        for p in running:
            p.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1.0)
        blocks = []
        for p in running:
            dumps = [line for line in p.log_lines() if line.get("event") == "tasks_dumped"]
            if not dumps:
                blocks.append(f"{p.name} ({p.log.name}): no dump (stopped?)")
                continue
            chains = ["  " + t["task"] + ":\n" + "\n".join("    " + link for link in t["awaits"])
                      for t in dumps[-1]["tasks"]]
            blocks.append(f"{p.name} ({p.log.name}):\n" + "\n".join(chains))
        return "\n".join(["tasks of every running process:", *blocks])

    async def _inject(self, fault: Fault) -> FaultResult:
        start = self.struck = time.monotonic()
        recovered: float | None = None
        note = ""
        match fault.kind:
            case "agent_kill":
                note = await self._agent_kill(fault.target)
            case "agent_crash":
                note = await self._agent_crash(fault.target, fault.hit)
            case "router_kill":
                old = await self.leader()
                head = await self.head()
                self._strike()
                old.kill9()
                await old.proc.wait()
                self.routers.append(await self._router(old.name))
                await self.wait_leader(other_than=old)
                await self.wait_head_beyond(head)
                self.routers.remove(old)
            case "router_crash":
                note = await self._router_crash(fault.point, fault.hit)
            case "router_pause":
                old = await self.leader()
                head = await self.head()
                self._strike()
                old.proc.send_signal(signal.SIGSTOP)
                try:
                    await self.wait_leader(other_than=old)
                    await self.wait_head_beyond(head)
                    recovered = time.monotonic()
                    await asyncio.sleep(max(0.0, fault.hold_s - (time.monotonic() - start)))
                finally:
                    old.proc.send_signal(signal.SIGCONT)
                await old.wait_logged("stepped_down")
            case "projector_crash":
                note = await self._projector_crash(fault.hit)
            case "server_kill":
                self._strike()
                await self.server.stop(signal.SIGKILL)
                await asyncio.sleep(fault.hold_s)
                await self.server.restart()
                assert self.cli is not None and self.admin is not None
                await wait_until(_connected(self.cli, self.admin), 30, what="clients reconnected")
                await self.wait_head_beyond(await self.head())
            case "disk_full":
                note = await self._disk_full(fault.hold_s)
            case _:
                raise ValueError(f"unknown fault {fault.kind!r}")
        return FaultResult(fault, (recovered or time.monotonic()) - self.struck, note)

    async def _agent_kill(self, name: str) -> str:
        async def busy() -> bool:
            return bool(await self.running_on(name))

        try:
            await wait_until(busy, 15, what=f"{name} running a skill")
        except TimeoutError:
            pass
        claimed = await self.running_on(name)
        self._strike()
        self.agents[name].kill9()
        await self.agents[name].proc.wait()
        self.agents[name] = await self._agent(name)
        # Recovered once what it held has been redelivered and settled elsewhere.
        await self.wait_settled(set(claimed), 60)
        return f"{len(claimed)} task(s) in hand"

    async def _agent_crash(self, name: str, hit: int) -> str:
        proc = await self.restart_agent(name, LEDGERBUS_FAILPOINTS=f"agent.skill_done=kill@{hit}")
        await asyncio.wait_for(proc.proc.wait(), 60)
        self._strike()
        claimed = await self.running_on(name)
        self.agents[name] = await self._agent(name)
        await self.wait_settled(set(claimed), 60)
        return f"{len(claimed)} task(s) in hand"

    async def _router_crash(self, point: str, hit: int) -> str:
        """Arm the standby, hand it the lease by stopping the leader cleanly, and let it
        die at ``point``; the other router (restarted) takes over from the crash."""
        leader = await self.leader()
        standby = next(r for r in self.routers if r is not leader and r.proc.returncode is None)
        await standby.stop()
        armed = await self._router(standby.name, LEDGERBUS_FAILPOINTS=f"{point}=kill@{hit}")
        await armed.wait_logged("standby")
        await leader.stop()
        self.routers = [armed]

        async def leads_or_died() -> bool:  # it may reach its fail point before we look
            return armed.proc.returncode is not None or await self._holder_pid() == armed.proc.pid

        await wait_until(leads_or_died, 30, what="the armed router leading")
        self.routers.append(await self._router(leader.name))
        await asyncio.wait_for(armed.proc.wait(), 60)
        self._strike()
        head = await self.head()
        await self.wait_leader(other_than=armed)
        await self.wait_head_beyond(head)
        self.routers = [r for r in self.routers if r is not armed] + [await self._router(armed.name)]
        return f"crashed at {point} with AUDIT at {head}"

    async def _disk_full(self, hold_s: float) -> str:
        """Fill the store's file system (a small tmpfs the test mounted) with a file, keep
        it full for ``hold_s``, delete the file and restart nats-server, as an operator
        would: since 2.14 a stream that met a write error refuses writes until its server
        restarts (nats-server#7788). Recovered once AUDIT moves again."""
        # Read before the disk fills: a full disk can leave the JetStream API unanswered
        # until the restart (seen when an AUDIT purge of the retention rule met it), and
        # the operator restarts whether or not it answers.
        head = await self.head()
        filler = self.store_dir.parent / "filler"
        chunk = b"\0" * (1 << 20)
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass  # ENOSPC: full
        with contextlib.suppress(OSError):
            filler.open("ab").write(b"\0" * 4096)  # and the last partial block
        full_mb = filler.stat().st_size >> 20
        await asyncio.sleep(hold_s)
        broken = sorted({m.group(1) for line in self.server.log_tail
                         if (m := re.search(r"stream '\$G > (\S+)' critical write error", line))})
        self._strike()
        filler.unlink()
        await self.server.stop()
        await self.server.restart()
        await self.wait_head_beyond(head)
        return f"{full_mb} MiB of filler; streams that met a write error: {', '.join(broken) or 'none'}"

    async def _projector_crash(self, hit: int) -> str:
        assert self.projector is not None
        await self.projector.stop()
        self.projector = await self._projector(LEDGERBUS_FAILPOINTS=f"projector.applied=kill@{hit}")
        await asyncio.wait_for(self.projector.proc.wait(), 60)
        self._strike()
        at = await self.projector_position()
        head = await self.head()
        self.projector = await self._projector()

        async def caught_up() -> bool:
            return await self.projector_position() >= head

        await wait_until(caught_up, 60, what="the projector caught up")
        return f"crashed with its file at {at}, AUDIT at {head}"

    # -- checks ------------------------------------------------------------------------

    async def verify(self) -> dict[str, Any]:
        """``agentctl audit verify --json``: the chain, and the live projections against a
        rebuild from the log (asked of the projector once it is at the head)."""
        head = await self.head()

        async def caught_up() -> bool:
            return await self.projector_position() >= head

        await wait_until(caught_up, 60, what="the projector at the head")
        code, out, err = await agentctl(self.settings, "audit", "verify", "--json", timeout=120)
        report: dict[str, Any] = json.loads(out) if out.strip() else {"ok": False, "problem": err}
        report["exit"] = code
        return report

    def crashed(self) -> list[str]:
        """Processes that died on their own: not killed by the harness, not stopped by it."""
        assert self.procs is not None
        return [f"{p.name} (exit {p.proc.returncode})" for p in self.procs.started
                if p.proc.returncode not in (None, 0, -signal.SIGKILL, -signal.SIGTERM)]


def _connected(*ncs: Client) -> Callable[[], Awaitable[bool]]:
    async def up() -> bool:
        return all(nc.is_connected for nc in ncs)

    return up


@dataclass
class Report:
    """One chaos run: its seed, schedule, per-fault recovery, verdict and checks."""

    seed: int
    faults: list[FaultResult]
    verdict: Verdict
    verify: dict[str, Any]
    crashed: list[str]
    longest_ack_gap_s: float
    elapsed_s: float
    submissions: list[Submission] = field(default_factory=list)
    records: list[AuditRecord] = field(default_factory=list)
    """The whole log at the end, for a test's own checks."""

    def summary(self) -> str:
        verify = "ok" if self.verify.get("ok") else self.verify.get("problem")
        head = (f"chaos seed={self.seed}: {self.verdict.counts()} outcomes={dict(self.verdict.outcomes)} "
                f"verify={verify} longest gap between PubAcks {self.longest_ack_gap_s:.2f}s, run {self.elapsed_s:.0f}s")
        lines = [head]
        lines += [f"  {r.fault}: recovered in {r.recovered_s:.2f}s{' (' + r.note + ')' if r.note else ''}"
                  for r in self.faults]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "counts": self.verdict.counts(), "outcomes": dict(self.verdict.outcomes),
                "faults": [{"fault": str(r.fault), "kind": r.fault.kind, "recovered_s": round(r.recovered_s, 2),
                            "note": r.note} for r in self.faults],
                "verify_ok": bool(self.verify.get("ok")), "crashed": self.crashed,
                "longest_ack_gap_s": round(self.longest_ack_gap_s, 2), "elapsed_s": round(self.elapsed_s, 1)}


async def run_schedule(system: System, seed: int, faults: list[Fault], warmup_s: float = 2.0,
                       rate: float = 8.0, load_s: float = 0.0, slow_s: float = 0.0) -> Report:
    """Load the system, inject ``faults`` in order (and keep loading for at least
    ``load_s``), settle, classify and verify."""
    assert system.cli is not None
    began = time.monotonic()
    load = Load(system.cli, random.Random(seed), rate, slow_s=slow_s)
    stop = asyncio.Event()
    loading = asyncio.create_task(load.run(stop))
    results: list[FaultResult] = []
    try:
        await asyncio.sleep(warmup_s)
        for fault in faults:
            await asyncio.sleep(fault.after_s)
            results.append(await system.inject(fault))
        await asyncio.sleep(max(1.0, load_s - (time.monotonic() - began)))
    finally:
        stop.set()
        await loading
    records = await system.records()
    pending = set(unsettled(load.submissions, records))
    with contextlib.suppress(TimeoutError):
        await system.wait_settled(pending, 90)
    records = await system.records()
    verdict = classify(load.submissions, records)
    gaps = [b - a for a, b in zip(load.ack_times, load.ack_times[1:], strict=False)]
    return Report(seed, results, verdict, await system.verify(), system.crashed(), max(gaps, default=0.0),
                  time.monotonic() - began, load.submissions, records)


def seed_from_env(default: int | None = None) -> int:
    """``LEDGERBUS_CHAOS_SEED`` if set, else ``default``, else a fresh random seed."""
    raw = os.environ.get("LEDGERBUS_CHAOS_SEED")
    if raw:
        return int(raw)
    return default if default is not None else random.SystemRandom().randrange(1, 1_000_000)


async def chaos(tmp: Path, workspace_root: Path, seed: int, faults: list[Fault], store_dir: Path | None = None,
                agent_env: dict[str, str] | None = None, **load: float) -> Report:
    """Run one schedule on a fresh system and check it: 0 lost, 0 duplicated, nothing
    crashed on its own, the chain and the projections verified. The seed and the
    schedule are printed first; the report (and ``LEDGERBUS_CHAOS_REPORT``) after.
    ``load`` goes to :func:`run_schedule` (``rate``, ``load_s``, ``slow_s``)."""
    print(f"chaos seed={seed} ({len(faults)} faults; replay with LEDGERBUS_CHAOS_SEED={seed}):", flush=True)
    for fault in faults:
        print(f"  {fault}", flush=True)
    system = System(tmp, workspace_root, store_dir, agent_env)
    try:
        await system.start()
        report = await run_schedule(system, seed, faults, **load)
    finally:
        await system.stop()
    print(report.summary(), flush=True)
    if path := os.environ.get("LEDGERBUS_CHAOS_REPORT"):
        with Path(path).open("a") as f:  # noqa: ASYNC230 - one line, after the run
            f.write(json.dumps(report.as_json()) + "\n")
    problems = []
    if report.verdict.lost or report.verdict.duplicated:
        problems.append(f"lost {report.verdict.lost[:10]} duplicated {report.verdict.duplicated[:10]}")
    if report.crashed:
        problems.append(f"crashed on their own: {report.crashed}")
    if not report.verify.get("ok"):
        problems.append(f"audit verify: {report.verify.get('problem')} (exit {report.verify.get('exit')})")
    if not report.verdict.ok:
        problems.append("nothing completed")
    assert not problems, "\n".join([*problems, report.summary()])
    return report
