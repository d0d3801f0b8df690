"""A soak: the shipped system routes N messages with retention on, and its memory and disk
are sampled as it goes: ``python -m bench --only soak``.

The system runs as a user starts it: ``agentctl init`` writes a project in a temporary
directory and ``honcho start`` runs its Procfile, with the changes the end-to-end
benchmark makes (``bench/e2e.py``: the producer's rate limit lifted, nats-server on a free
port, a clean environment, tracing as shipped) and one more: a ``[retention]`` table in the
project's ``policy.toml`` (docs/architecture.md, "Retention and archives") set so that the
rule bites several times within the run. Before honcho starts, the edited policy is loaded
with ``router/policy.py``; a router that does not know the table would refuse to start, and
the run stops there and says so (``--soak-no-retention`` soaks without it).

The feed: one client connected as ``cli-bench`` publishes no-op ``echo`` tasks to
``in.cli.bench.task_submitted`` pipelined (as ``agentctl submit`` does), keeping at most
``window`` tasks submitted and not yet settled (completed, failed or rejected, as the
client sees on AUDIT), so INGRESS and WORK stay bounded and the rate is what the system
sustains; ``rate`` caps it further. Each ``echo`` task costs the router two messages (as
in the end-to-end benchmark): its ``task_submitted`` and the agent's ``task_completed``,
which carries the claim; so N messages are N / 2 tasks. The messages routed are counted on
AUDIT itself (its last sequence since the feed began: one record per message the router
took in, with the heartbeats, checkpoints and retention records the system adds).

Every ``sample_s`` seconds (and once more after a settling pause at the end) a sample:
the resident set (``VmRSS``) of every process working in the project directory, by role
(the leading router, the standby, the projector, its writer child, nats-server, and all of
them together, the router's snapshot-encoding child included); the disk use (allocated
blocks) of the JetStream store, of the AUDIT stream's directory in it, of the projection
(``var/ledgerbus.db`` with ``-wal`` and ``-shm``) and of the archive directory; AUDIT's
first and last sequence, messages and bytes (stream info); INGRESS and WORK depths; the
tasks completed. ``bench/soak_report.py`` turns the samples into a CSV, a plot, the verdicts
(flat RSS, bounded disk) and a section of docs/benchmarks.md.

If honcho stops meanwhile (it stops every process once one exits), the run stops at once,
naming the process that exited first and its last line; honcho's whole log is kept in
``bench/results/soak-honcho.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from rich.markup import escape

from bench import e2e, procs
from ledgerbus.bus import codec, subjects
from ledgerbus.bus.archive import parse_duration
from ledgerbus.bus.connection import connect
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.publish import Publisher

MESSAGES_PER_TASK = 2
"""An ``echo`` task's messages through the router: its submission, and its result carrying
its claim (``claim_first = False``)."""
BATCH = 256
"""Submissions published together (pipelined, PubAcks awaited per batch)."""
STALL_S = 180.0
"""No task settled for this long while some are outstanding: the run stops with an error."""
ARCHIVE_DIR = "var/archive"
@dataclasses.dataclass(frozen=True)
class Retention:
    """The ``[retention]`` table the soak writes (see docs/architecture.md)."""

    audit_max_age: str = "7d"
    audit_max_bytes: int = 32 * 2**20
    segment_records: int = 10_000
    archive_dir: str = ARCHIVE_DIR
    archive_max_age: str = "3m"
    check_every: str = "5s"

    def toml(self) -> str:
        # Bytes as a string of digits: the table's default is "0", so a plain number of
        # bytes is what any reading of the key must accept.
        return ("[retention]\n"
                f'audit_max_age = "{self.audit_max_age}"\n'
                f'audit_max_bytes = "{self.audit_max_bytes}"\n'
                f"segment_records = {self.segment_records}\n"
                f'archive_dir = "{self.archive_dir}"\n'
                f'archive_max_age = "{self.archive_max_age}"\n'
                f'check_every = "{self.check_every}"\n')


class SoakSystem(e2e.System):
    """``agentctl init`` in a temporary directory, then ``honcho start`` there, as the
    end-to-end benchmark runs it, with the ``[retention]`` table added to policy.toml."""

    prefix = "ledgerbus-soak-"

    def __init__(self, repo: Path, retention: Retention | None) -> None:
        self.retention = retention
        super().__init__(repo, traced=True)

    def write_project(self) -> None:
        proc = subprocess.run([str(e2e.SCRIPTS / "agentctl"), "init", str(self.dir)], env=self.env(),
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode:
            raise e2e.BenchError(f"agentctl init failed ({proc.returncode}): {proc.stderr.strip()}")

    def edit_policy(self, text: str) -> str:
        if self.retention is None:
            return text
        # The shipped table (7 days, which never bites in a run) is replaced by the soak's.
        text = re.sub(r"^\[retention\]\n(?:[^\[].*\n|\n)*", "", text + "\n", flags=re.MULTILINE)
        return f"{text.rstrip()}\n\n# Set by the soak bench (bench/soak.py).\n{self.retention.toml()}"


# -- sampling ------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One row of the CSV. Sizes in bytes; ``messages`` is AUDIT's last seq since the feed began."""

    t_s: float
    messages: int
    tasks_submitted: int
    tasks_completed: int
    tasks_failed: int
    rejected: int
    audit_archived: int
    archive_expired: int
    audit_first_seq: int
    audit_last_seq: int
    audit_messages: int
    audit_bytes: int
    audit_dir_bytes: int
    ingress_messages: int
    work_messages: int
    store_bytes: int
    projection_bytes: int
    archive_bytes: int
    archive_files: int
    log_bytes: int
    rss_router: int
    rss_router_standby: int
    rss_projector: int
    rss_writer: int
    rss_nats: int
    rss_all: int
    leader_pid: int


def du(path: Path) -> tuple[int, int]:
    """(bytes allocated, files) under ``path``, as ``du`` counts them; files that vanish
    while it walks (JetStream removes blocks) are skipped."""
    total, files = 0, 0
    if path.is_file():
        with contextlib.suppress(OSError):
            return path.stat().st_blocks * 512, 1
        return 0, 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
                files += 1
    return total, files


def rss(pid: int) -> tuple[int, int]:
    """The resident set of ``pid`` in bytes (``VmRSS``, 0 if it is gone) and its parent's pid."""
    size, parent = 0, 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("PPid:"):
                parent = int(line.split()[1])
    return size, parent


class Leader:
    """The leading router's pid, from the ``lease_acquired`` lines of honcho's log, read
    incrementally (the log grows with every task)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.pid = 0
        self._rest = b""

    def current(self) -> int:
        with contextlib.suppress(OSError), self.log.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset += len(chunk)
            lines = (self._rest + chunk).split(b"\n")
            self._rest = lines.pop()
            for line in lines:
                if b"lease_acquired" in line:
                    found = e2e._LEADER.search(line.decode(errors="replace"))
                    if found:
                        self.pid = int(found.group(1))
        return self.pid


_RECOVERED = re.compile(r"audit_recovered\s+(.*)$")
_PAIR = re.compile(r"(\w+)=(\S+)")


async def takeover(log: Path, leader: Leader, say: Callable[[str], None]) -> dict[str, Any]:
    """Pause the leading router (SIGSTOP) until the standby takes the lease and recovers,
    then let it go on (it steps down): what the standby's ``audit_recovered`` says (the
    takeover's recovery: from which snapshot, how long a tail, how long, how many tasks)."""
    old = leader.current()
    offset = log.stat().st_size
    paused = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    try:
        while time.monotonic() - paused < 120:
            await asyncio.sleep(0.5)
            with log.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            found = next((_RECOVERED.search(line) for line in text.splitlines() if "audit_recovered" in line), None)
            if found is not None:
                pairs = dict(_PAIR.findall(found.group(1)))
                seen = {k: pairs.get(k) for k in ("from_snapshot", "tail", "head_seq", "tasks", "seconds")}
                result = {k: (None if v in (None, "None", "null") else float(v) if k == "seconds" else int(v))
                          for k, v in seen.items()} | {"paused_to_recovered_s": round(time.monotonic() - paused, 2)}
                say(f"  takeover at {result['head_seq']:,} records: recovery {result['seconds']} s from the snapshot at "
                    f"{result['from_snapshot']} (tail {result['tail']}, {result['tasks']:,} tasks in the state)")
                return result
        raise e2e.BenchError("the standby did not take over within 120 s of pausing the leader")
    finally:
        os.kill(old, signal.SIGCONT)


def memory(directory: Path, leader: int) -> tuple[dict[str, int], dict[str, int]]:
    """RSS by role of every process working under ``directory``, and ``all`` of them; and
    RSS by process name (``agent echo-1``, ``web``, ...; processes of one name summed)."""
    found = {"router": 0, "router_standby": 0, "projector": 0, "writer": 0, "nats": 0, "all": 0}
    by_name: dict[str, int] = {}
    for pid in procs.pids(procs.cwd_under(directory)):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            name = procs.process_name(pid)
            size, parent = rss(pid)
            if name == "router" and parent == leader:
                # The child the leader forks to encode a snapshot (router/snapshots.py): its
                # pages are the router's, shared copy-on-write, so counted twice in "all".
                name = "router (snapshot child)"
            elif name == "router" and pid != leader:
                name = "router (standby)"
            role = {"router": "router", "router (standby)": "router_standby", "projector": "projector",
                    "projector writer": "writer", "nats-server": "nats"}.get(name)
            if role:
                found[role] += size
            found["all"] += size
            by_name[name] = by_name.get(name, 0) + size
    return found, dict(sorted(by_name.items()))


class Counts:
    """What the client sees on AUDIT: tasks settled, and the retention records."""

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.archived = 0
        self.expired = 0
        self.problems: list[str] = []
        self.changed = asyncio.Event()

    @property
    def settled(self) -> int:
        return self.completed + self.failed + self.rejected

    async def on_completed(self, msg: Msg) -> None:
        self.completed += 1
        self.changed.set()

    async def on_failed(self, msg: Msg) -> None:
        self.failed += 1
        self._note(msg)
        self.changed.set()

    async def on_rejected(self, msg: Msg) -> None:
        # audit.rejected.<kind>.<key>: a rejected submission settles its task.
        if msg.subject.split(".")[2] == "task_submitted":
            self.rejected += 1
            self.changed.set()
        self._note(msg)

    async def on_archived(self, msg: Msg) -> None:
        self.archived += 1

    async def on_expired(self, msg: Msg) -> None:
        self.expired += 1

    def _note(self, msg: Msg) -> None:
        if len(self.problems) < 5:
            with contextlib.suppress(Exception):
                record = codec.decode_record(msg.data)
                self.problems.append(f"{msg.subject}: {record.reason or record.code or record.kind}")


async def joined(js: JetStreamContext, agents: set[str], timeout: float) -> None:
    """Wait until every agent named has an accepted ``agent_joined`` record on AUDIT; else
    say which have not."""
    await e2e._audit_ready(js, time.monotonic() + timeout)
    sub = await js.subscribe("audit.accepted.agent_joined.*", stream=subjects.AUDIT_STREAM, ordered_consumer=True)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while not agents <= seen:
            try:
                msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            except nats.errors.TimeoutError:
                raise e2e.BenchError(f"not every agent joined within {timeout:g} s: missing "
                                     f"{sorted(agents - seen)}") from None
            seen.add(msg.subject.rsplit(".", 1)[1])
    finally:
        await sub.unsubscribe()


class Soak:
    """One soak run against a started :class:`SoakSystem`."""

    def __init__(self, system: SoakSystem, tasks: int, window: int, rate: float, sample_s: float,
                 settle_s: float, say: Callable[[str], None]) -> None:
        self.system = system
        self.tasks = tasks
        self.window = window
        self.rate = rate
        self.sample_s = sample_s
        self.settle_s = settle_s
        self.say = say
        self.counts = Counts()
        self.submitted = 0
        self.samples: list[Sample] = []
        self.by_name: list[dict[str, int]] = []
        """Per sample, RSS by process name."""
        self.leader = Leader(system.log_path)
        self.store = system.dir / "var" / "jetstream"
        self.db = system.dir / "var" / "ledgerbus.db"
        self.archive = system.dir / (system.retention.archive_dir if system.retention else ARCHIVE_DIR)
        self.seq0 = 0
        self.began = 0.0
        self.takeover_results: list[dict[str, Any]] = []

    async def sample(self, js: JetStreamContext) -> Sample:
        audit = (await js.stream_info(subjects.AUDIT_STREAM)).state
        ingress = (await js.stream_info(subjects.INGRESS_STREAM)).state.messages
        work = (await js.stream_info(subjects.WORK_STREAM)).state.messages
        leader = self.leader.current()

        def files() -> tuple[tuple[dict[str, int], dict[str, int]], tuple[int, int], int, int, tuple[int, int], int]:
            audit_dirs = list(self.store.glob("**/streams/AUDIT"))
            projection = sum(du(self.db.with_name(self.db.name + suffix))[0] for suffix in ("", "-wal", "-shm"))
            log = self.system.log_path.stat().st_size if self.system.log_path.exists() else 0
            return (memory(self.system.dir, leader), du(self.store),
                    sum(du(d)[0] for d in audit_dirs), projection, du(self.archive), log)

        (mem, by_name), store, audit_dir, projection, archive, log = await asyncio.to_thread(files)
        c = self.counts
        row = Sample(
            t_s=round(time.monotonic() - self.began, 2), messages=audit.last_seq - self.seq0,
            tasks_submitted=self.submitted, tasks_completed=c.completed, tasks_failed=c.failed, rejected=c.rejected,
            audit_archived=c.archived, archive_expired=c.expired, audit_first_seq=audit.first_seq,
            audit_last_seq=audit.last_seq, audit_messages=audit.messages, audit_bytes=audit.bytes,
            audit_dir_bytes=audit_dir, ingress_messages=ingress, work_messages=work, store_bytes=store[0],
            projection_bytes=projection, archive_bytes=archive[0], archive_files=archive[1], log_bytes=log,
            rss_router=mem["router"], rss_router_standby=mem["router_standby"], rss_projector=mem["projector"],
            rss_writer=mem["writer"], rss_nats=mem["nats"], rss_all=mem["all"], leader_pid=leader)
        self.samples.append(row)
        self.by_name.append(by_name)
        return row

    def _line(self, s: Sample) -> str:
        mib = 2**20
        return (f"  {s.t_s:7.0f} s {s.messages:>10,} msgs {s.tasks_completed:>9,} done | RSS MiB router "
                f"{s.rss_router / mib:5.0f} projector {s.rss_projector / mib:4.0f}+{s.rss_writer / mib:3.0f} all "
                f"{s.rss_all / mib:5.0f} | disk MiB store {s.store_bytes / mib:6.0f} AUDIT {s.audit_bytes / mib:5.0f} "
                f"(seq {s.audit_first_seq:,}-{s.audit_last_seq:,}) db {s.projection_bytes / mib:4.0f} "
                f"archive {s.archive_bytes / mib:4.0f} | INGRESS {s.ingress_messages} WORK {s.work_messages}")

    async def sampler(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sample_s)
            if not stop.is_set():
                try:
                    self.say(self._line(await self.sample(js)))
                except (nats.errors.Error, TimeoutError) as exc:  # a slow server: the next one will do
                    self.say(f"  sample skipped: {exc!r}")

    async def feed(self, cli: Any) -> None:
        """Submit ``tasks`` echo tasks, at most ``window`` unsettled at a time."""
        publisher = await Publisher(cli).start()
        subject = subjects.ingress(e2e.CLI, "task_submitted")
        c = self.counts
        started = time.monotonic()
        last_settled, last_progress = 0, started
        try:
            while self.submitted < self.tasks:
                free = min(self.window - (self.submitted - c.settled), self.tasks - self.submitted, BATCH)
                if self.rate > 0:
                    free = min(free, int((time.monotonic() - started) * self.rate) - self.submitted + 1)
                if free <= 0:
                    c.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(c.changed.wait(), 0.05)
                    if c.settled != last_settled or c.settled == self.submitted:  # moving, or waiting on --soak-rate
                        last_settled, last_progress = c.settled, time.monotonic()
                    elif time.monotonic() - last_progress > STALL_S:
                        raise e2e.BenchError(f"no task settled for {STALL_S:g} s ({c.settled:,} of "
                                             f"{self.submitted:,} submitted)")
                    continue
                batch = []
                for i in range(self.submitted, self.submitted + free):
                    event = TaskSubmitted(id=new_id(), task_id=f"s{i}", skill="echo", input={"text": "hello"})
                    batch.append((subject, codec.encode(event), {subjects.HDR_MSG_ID: event.id}))
                acks = await publisher.publish(batch, timeout=60)
                failed = [a for a in acks if isinstance(a, BaseException)]
                if failed:
                    raise e2e.BenchError(f"{len(failed)} of {len(batch)} submissions got no PubAck: {failed[0]}")
                self.submitted += free
            while c.settled < self.tasks:
                c.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(c.changed.wait(), 1)
                if c.settled != last_settled:
                    last_settled, last_progress = c.settled, time.monotonic()
                elif time.monotonic() - last_progress > STALL_S:
                    raise e2e.BenchError(f"no task settled for {STALL_S:g} s ({c.settled:,} of {self.tasks:,})")
        finally:
            await publisher.close()

    async def run(self) -> dict[str, Any]:
        """The soak, stopped with the reason as soon as honcho stops (it stops every process
        once one exits)."""
        work = asyncio.create_task(self._soak())
        watch = asyncio.create_task(self._honcho_stopped())
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            watch.cancel()
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise e2e.BenchError(watch.result())

    async def _honcho_stopped(self) -> str:
        proc = self.system.proc
        assert proc is not None
        while proc.poll() is None:
            await asyncio.sleep(0.5)
        return f"honcho stopped (exit {proc.returncode}) while the soak ran: {first_exit(self.system.log_path)}"

    async def _soak(self) -> dict[str, Any]:
        cli = await connect(self.system.settings, e2e.CLI.token)
        try:
            return await self._measure(cli)
        finally:
            await cli.close()

    async def _measure(self, cli: Any) -> dict[str, Any]:
        js = cli.jetstream(timeout=30)
        started = time.monotonic()
        await joined(js, self.system.agents, timeout=180)
        self.say(f"  {len(self.system.agents)} agents joined {time.monotonic() - started:.1f} s after the client "
                 "connected")
        c = self.counts
        subs = []
        for subject, cb in (("audit.accepted.task_completed.*", c.on_completed),
                            ("audit.accepted.task_failed.*", c.on_failed), ("audit.rejected.>", c.on_rejected),
                            ("audit.accepted.audit_archived.>", c.on_archived),
                            ("audit.accepted.archive_expired.>", c.on_expired)):
            subs.append(await js.subscribe(subject, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
                                           deliver_policy=DeliverPolicy.NEW, cb=cb))
        stop = asyncio.Event()
        self.seq0 = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
        self.began = time.monotonic()
        self.say(self._line(await self.sample(js)))
        sampling = asyncio.create_task(self.sampler(js, stop))
        takeovers = asyncio.create_task(self.takeovers(js, stop))
        try:
            await self.feed(cli)
            fed = time.monotonic() - self.began
            fed_messages = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq - self.seq0
            self.say(f"  all {self.tasks:,} tasks settled after {fed:.0f} s; settling {self.settle_s:g} s more")
            await asyncio.sleep(self.settle_s)
        finally:
            stop.set()
            await sampling
            with contextlib.suppress(asyncio.CancelledError):
                await takeovers
        # And one at the end: the state a standby loads after the whole run.
        self.takeover_results.append(await takeover(self.system.log_path, self.leader, self.say))
        self.say(self._line(await self.sample(js)))
        streams = await asyncio.to_thread(self.streams)
        self.say("  JetStream store by stream at the end, MiB: "
                 + ", ".join(f"{name} {size / 2**20:,.1f}" for name, size in streams.items()))
        for sub in subs:
            await sub.unsubscribe()
        return {"feed_s": fed, "feed_messages": fed_messages, "messages_per_s": fed_messages / fed,
                "tasks_per_s": self.tasks / fed, "problems": c.problems, "takeovers": self.takeover_results,
                "streams_end": streams}

    def streams(self) -> dict[str, int]:
        """Disk use of each stream's directory in the store, largest first."""
        sizes = {path.name: du(path)[0] for path in self.store.glob("**/streams/*") if path.is_dir()}
        return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))

    async def takeovers(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        """A standby takeover (:func:`takeover`) once a tenth of the messages are routed: the
        same run's early and late takeovers say whether it stays flat as the log grows."""
        target = self.seq0 + self.tasks * MESSAGES_PER_TASK // 10
        while not stop.is_set():
            if (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq >= target:
                self.takeover_results.append(await takeover(self.system.log_path, self.leader, self.say))
                return
            await asyncio.sleep(1.0)


_STOPPED = re.compile(r"^\S+ system\s+\| (\S+) stopped \(rc=(-?\d+)\)", re.MULTILINE)


def first_exit(log: Path) -> str:
    """Which process of honcho's log stopped first, its exit status and its last line."""
    text = log.read_text(errors="replace")
    found = _STOPPED.search(text)
    if found is None:
        return "no process is logged as stopped"
    name, rc = found.groups()
    said = [line.split("| ", 1)[1].strip() for line in text[:found.start()].splitlines()
            if re.match(rf"^\S+ {re.escape(name)}\s+\|", line) and "| " in line]
    return f"{name} exited first (rc={rc})" + (f", its last line: {said[-1]}" if said else "")

def run(repo: Path, messages: int, sample_s: float, window: int, rate: float, retention: Retention | None,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the system, feed it ``messages`` (``messages / 2`` echo tasks), sample; the
    samples and what is needed to judge them."""
    tasks = max(1, -(-messages // MESSAGES_PER_TASK))
    settle_s = max(3 * (parse_duration(retention.check_every) if retention else 0), 2 * sample_s, 10.0)
    say(f"soak: {messages:,} messages = {tasks:,} echo tasks x {MESSAGES_PER_TASK} (its task_submitted and the "
        f"agent's task_completed carrying its claim); at most {window:,} tasks unsettled"
        + (f", at most {rate:g} tasks/s" if rate > 0 else "") + f"; a sample every {sample_s:g} s")
    if retention is None:
        say("[yellow]retention off[/] (--soak-no-retention): policy.toml has no \\[retention] table; nothing bounds "
            "AUDIT")
    else:
        table = retention.toml().strip().replace("\n", "\n  ")
        say(f"retention, added to the project's policy.toml:\n  {escape(table)}")
    try:
        system = SoakSystem(repo, retention)
    except ConfigError as exc:
        raise e2e.BenchError(
            f"{exc}\nThis checkout's policy loader (router/policy.py) does not accept the [retention] table, so the "
            "router would refuse to start. Run the soak where retention is implemented, or pass "
            "--soak-no-retention to measure without it (AUDIT then grows unbounded).") from exc
    say(f"  project: {system.dir} (agentctl init), {system.url}")
    try:
        system.start()
        soak = Soak(system, tasks, window, rate, sample_s, settle_s, say)
        try:
            found = asyncio.run(soak.run())
        except (e2e.BenchError, TimeoutError, OSError, nats.errors.Error) as exc:
            system.stop()
            kept = repo / "bench" / "results" / "soak-honcho.log"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(system.log_path, kept)
            raise e2e.BenchError(f"soak failed: {str(exc) or repr(exc)}\n--- honcho log, last lines (all of it in "
                                 f"{kept}) ---\n{procs.tail(system.log_path)}") from exc
        finally:
            notes = system.stop()
    finally:
        system.close()
    return found | {
        "messages": messages, "tasks": tasks, "messages_per_task": MESSAGES_PER_TASK, "window": window,
        "rate": rate, "sample_s": sample_s, "settle_s": settle_s,
        "retention": dataclasses.asdict(retention) if retention else None,
        "samples": [dataclasses.asdict(s) for s in soak.samples], "rss_by_process": soak.by_name, "notes": notes,
    }
