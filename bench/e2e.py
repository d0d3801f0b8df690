"""The task path end to end, as shipped, beside Celery: ``python -m bench --only e2e``.

ledgerbus runs as a user starts it: ``honcho start`` in a temporary copy of the
repository's Procfile, nats.conf, policy.toml, llm.toml and profiles.toml (the processes
keep their state in ``var/`` under their working directory), with two changes only:

- policy.toml gets an exact entry lifting the rate limit of the producing CLI user
  (``cli-bench``), so the rate check still runs for every submission but never rejects;
- the Procfile's ``agentctl nats`` line gets ``--port N``, a free loopback port, and every
  process ``LEDGERBUS_URL`` to match, so that runs do not collide with a system on 4222
  (nats.conf's ``listen`` is a fixed port; nats-server's command line overrides it).

The processes get the caller's environment less every ``LEDGERBUS_*`` and ``OTEL_*``
variable, so the shipped defaults apply whatever the shell says; tracing is on, as shipped.
Once every agent of the Procfile has joined (their ``agent_joined`` records on AUDIT, read
as the CLI user), a client connected as ``cli-bench``:

1. warms up with ten ``echo`` tasks one at a time;
2. latency: submits one ``echo`` task, waits for its accepted ``task_completed`` record on
   AUDIT, and repeats (``samples`` times): p50 and p99 of submit → completed seen, and of
   each of its hops (:data:`HOPS`, from both audit records of each sample);
3. after a pause: ``paused`` tasks more one at a time, each after a pause of 0.2-0.8 s
   (:func:`bench.common.pauses`, the same for every system): a person's task, which finds
   every process idle; its p50;
4. throughput: subscribes to the ``task_completed`` records, publishes ``tasks``
   ``TaskSubmitted`` to ``in.cli.bench.task_submitted`` pipelined (as ``agentctl submit``
   does, ``Nats-Msg-Id`` = the message id), and stops the clock at the last completed.

Then SIGINT to honcho (Ctrl-C), which stops every process; anything left running from the
project directory is reported, and killed. The same again with ``OTEL_SDK_DISABLED=true``
(docs/observability.md: no tracing and no metrics at all), as the untraced reference.

Celery 5 with Redis on loopback, in the same run and with the same steps
(``bench/celery_side.py``).

Each round runs the three in turn, the order reversed every other round; medians of the
rounds are reported. ``--profile`` adds one more traced ledgerbus run, not counted, with
py-spy sampling the leading router during the throughput step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from bench import celery_side, procs
from bench.common import SCRIPTS, WARMUP, BenchError, free_port, pauses, percentile
from ledgerbus.bus import codec, subjects
from ledgerbus.bus.connection import connect
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.identity import procfile_agents
from ledgerbus.bus.jsmeta import ack_meta
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.settings import Settings
from ledgerbus.router import policy as router_policy

SHIPPED = ("Procfile", "nats.conf", "policy.toml", "llm.toml", "profiles.toml")
CLI_NAME = "bench"
CLI = subjects.principal("cli", CLI_NAME)
"""The virtual environment's bin/: honcho, agentctl, celery and py-spy come from there."""
SYSTEMS = ("ledgerbus", "ledgerbus-every-trace", "ledgerbus-untraced", "celery")
LABELS = {"ledgerbus": "ledgerbus, as shipped (traced, ≤ 50 new traces/s)",
          "ledgerbus-every-trace": "ledgerbus, every task traced (LEDGERBUS_TRACE_RATE=inf)",
          "ledgerbus-untraced": "ledgerbus, OTEL_SDK_DISABLED=true",
          "celery": "Celery + Redis, prefork, concurrency 2"}
_NATS_LINE = re.compile(r"^(nats:\s*agentctl nats)\s*$", re.MULTILINE)
_LEADER = re.compile(r"lease_acquired.*\binstance=\S*?-(\d+)-[0-9a-f]{6}\b")


# -- ledgerbus -----------------------------------------------------------------------------


def lift_rate_limit(text: str, principal: str) -> str:
    """policy.toml with an exact rate-limit entry for ``principal`` that never runs dry."""
    header = "[rate_limits]\n"
    if text.count(header) != 1:
        raise BenchError("policy.toml has no single [rate_limits] table to lift the producer's limit in")
    return text.replace(header, f'{header}"{principal}" = {{ rate = 1e9, burst = 1000000000 }}\n', 1)


def with_port(procfile: str, port: int) -> str:
    """The Procfile with ``--port`` passed through ``agentctl nats`` to nats-server."""
    text, found = _NATS_LINE.subn(rf"\1 --port {port}", procfile)
    if found != 1:
        raise BenchError("the Procfile has no single `nats: agentctl nats` line to give a port to")
    return text


class System:
    """``honcho start`` in a temporary copy of the project's shipped files (see the module)."""

    prefix = "ledgerbus-e2e-"

    def __init__(self, repo: Path, traced: bool, every_trace: bool = False) -> None:
        self.repo = repo
        self.traced = traced
        self.every_trace = every_trace
        self._tmp = tempfile.TemporaryDirectory(prefix=self.prefix)
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "honcho.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        port = free_port()
        self.url = f"nats://127.0.0.1:{port}"
        self.settings = Settings(url=self.url, auth_dir=self.dir / "var" / "auth", connect_timeout_s=120)
        try:
            self.write_project()
            policy = self.dir / "policy.toml"
            policy.write_text(self.edit_policy(lift_rate_limit(policy.read_text(), CLI.token)))
            limit = router_policy.load(policy).rate_limit(CLI.token)
            if limit is None or limit[0] != CLI.token:
                raise BenchError(f"the lifted rate limit does not apply to {CLI.token}")
            procfile = self.dir / "Procfile"
            procfile.write_text(with_port(procfile.read_text(), port))
        except BaseException:
            self.close()
            raise
        self.agents = {ident.name for ident in procfile_agents(procfile)}

    def write_project(self) -> None:
        """The project's files in ``self.dir``: here, copies of the repository's."""
        for name in SHIPPED:
            shutil.copy2(self.repo / name, self.dir / name)

    def edit_policy(self, text: str) -> str:
        """policy.toml as this run wants it, after the producer's rate limit is lifted."""
        return text

    def env(self) -> dict[str, str]:
        """The caller's environment without ledgerbus or OpenTelemetry settings, plus the URL."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGERBUS_", "OTEL_"))}
        env["PATH"] = f"{SCRIPTS}{os.pathsep}{env.get('PATH', '')}"
        env["LEDGERBUS_URL"] = self.url
        env["LEDGERBUS_CLI_NAME"] = CLI_NAME  # agentctl nats makes this user's credentials
        env["LEDGERBUS_WEB_PORT"] = "0"  # the HTTP API on any free port: never 8080 taken by someone else
        if not self.traced:
            env["OTEL_SDK_DISABLED"] = "true"
        elif self.every_trace:
            env["LEDGERBUS_TRACE_RATE"] = "inf"
        return env

    def start(self) -> None:
        """Start honcho in its own process group (Ctrl-C in a terminal reaches only it)."""
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([str(SCRIPTS / "honcho"), "start"], cwd=self.dir, env=self.env(),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def leader_pid(self) -> int | None:
        """The pid of the router holding the lease, from its ``lease_acquired`` log line."""
        found = _LEADER.findall(self.log_path.read_text(errors="replace"))
        return int(found[-1]) if found else None

    def stop(self) -> list[str]:
        """SIGINT to honcho, as Ctrl-C; what honcho had to kill and what outlived it."""
        notes: list[str] = []
        if self.proc is not None:
            notes += procs.stop(self.proc, signal.SIGINT, 60, "honcho")
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        killed = sorted(set(re.findall(r"sending SIGKILL to (\S+) \(pid", self.log_path.read_text(errors="replace"))))
        if killed:
            notes.append(f"honcho SIGKILLed {', '.join(killed)} (still running 5 s after its SIGTERM)")
        notes += procs.reap(procs.pids(procs.cwd_under(self.dir)), "honcho")
        return notes

    def close(self) -> None:
        """Remove the project copy (its var/ with the JetStream store and the database)."""
        self._tmp.cleanup()


async def _audit_ready(js: JetStreamContext, deadline: float) -> None:
    # The router provisions the streams once it holds the lease; nothing announces it to a
    # CLI user, so ask until AUDIT exists.
    while True:
        try:
            await js.stream_info(subjects.AUDIT_STREAM)
            return
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def joined(js: JetStreamContext, agents: set[str], timeout: float) -> None:
    """Wait until every agent named has an accepted ``agent_joined`` record on AUDIT."""
    await _audit_ready(js, time.monotonic() + timeout)
    sub = await js.subscribe("audit.accepted.agent_joined.*", stream=subjects.AUDIT_STREAM, ordered_consumer=True)
    seen: set[str] = set()
    try:
        async with asyncio.timeout(timeout):
            while not agents <= seen:
                seen.add((await sub.next_msg(timeout=timeout)).subject.rsplit(".", 1)[1])
    finally:
        await sub.unsubscribe()


class Stamp(NamedTuple):
    """One audit record of a latency sample, in POSIX seconds on this machine's clock."""

    made: float
    """When the router built it (its ``at``: the checks are done)."""
    stored: float
    """When AUDIT stored it (JetStream's timestamp)."""
    seen: float
    """When this client received it."""


HOPS = ("submitted → router's verdict", "verdict appended", "dispatch → agent → result's verdict",
        "result appended", "record → client")
"""Where one task's time goes, in order; the five add up to submit → completed seen."""


def hops(sent: float, submitted: Stamp, completed: Stamp) -> tuple[float, ...]:
    """One sample's time in each of :data:`HOPS`, in seconds: from ``sent`` (the client's
    publish) to the router's record of the submission, to AUDIT storing it, on through WORK,
    the agent and its report to the router's record of the result, to AUDIT storing that,
    to this client receiving it."""
    return (submitted.made - sent, submitted.stored - submitted.made, completed.made - submitted.stored,
            completed.stored - completed.made, completed.seen - completed.stored)


def hop_percentiles(samples: list[tuple[float, ...]]) -> dict[str, dict[str, float]]:
    """p50 and p99 of each of :data:`HOPS`, in milliseconds."""
    return {name: {"p50": statistics.median(col) * 1000, "p99": percentile(list(col), 99) * 1000}
            for name, col in zip(HOPS, zip(*samples, strict=True), strict=True)}


class Completions:
    """Accepted ``task_completed`` records as they reach the client, by task id, and any
    rejection or failure, which ends the run with its reason."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.sampled: set[str] = set()
        """The latency samples' task ids: only their records are stamped."""
        self.stamps: dict[tuple[str, str], Stamp] = {}
        """(kind, task id) → when a latency sample's record was made, stored and seen."""
        self.count = 0
        self.target = 0
        self.all_done: asyncio.Future[float] | None = None
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_completed(self, msg: Msg) -> None:
        now = time.perf_counter()
        task_id = msg.subject.rsplit(".", 1)[1]  # audit.accepted.task_completed.<task id>
        fut = self.waiting.pop(task_id, None)
        if task_id in self.sampled:
            self._stamp(msg, task_id)
        if fut is not None and not fut.done():
            fut.set_result(now)
        self.count += 1
        if self.all_done is not None and self.count >= self.target and not self.all_done.done():
            self.all_done.set_result(now)

    async def on_submitted(self, msg: Msg) -> None:
        task_id = msg.subject.rsplit(".", 1)[1]
        if task_id in self.sampled:
            self._stamp(msg, task_id)

    async def stamped(self, task_ids: list[str], timeout: float = 10.0) -> None:
        """Wait until both records of every sample are stamped (they come on two consumers,
        so a submission's record may arrive after its result's)."""
        deadline = time.monotonic() + timeout
        while any((kind, t) not in self.stamps for t in task_ids for kind in ("task_submitted", "task_completed")):
            if time.monotonic() > deadline:
                raise BenchError(f"the latency samples' audit records did not all arrive within {timeout:g} s")
            await asyncio.sleep(0.01)

    def _stamp(self, msg: Msg, task_id: str) -> None:
        # Only for the latency samples: the throughput step's records are not decoded.
        seen = time.time()
        record = codec.decode_record(msg.data)
        self.stamps[record.kind, task_id] = Stamp(made=record.at.timestamp(), stored=ack_meta(msg).stored_s, seen=seen)

    async def on_bad(self, msg: Msg) -> None:
        if not self.failed.done():
            record = codec.decode_record(msg.data)
            self.failed.set_result(f"{msg.subject}: {record.reason or record.event}")

    async def until(self, fut: asyncio.Future[float], timeout: float) -> float:
        """The time ``fut`` completed, unless a task failed or was rejected first."""
        either: set[asyncio.Future[Any]] = {fut, self.failed}
        done, _ = await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.failed in done:
            raise BenchError(f"a task did not complete: {self.failed.result()}")
        if fut not in done:
            raise BenchError(f"no completion within {timeout:g} s ({self.count} completed so far)")
        return fut.result()


QUIET_WAIT_S = 60.0
QUIET_CPU = 0.1
"""Cores the whole system may use and be called quiet (agents with LLM skills import the SDKs
after they join, about 3 s of CPU each here)."""


async def until_quiet(directory: Path, window: float = 1.0) -> float | None:
    """Seconds until the processes under ``directory`` used less than ``QUIET_CPU`` cores
    over ``window``; ``None`` if not within ``QUIET_WAIT_S``."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_WAIT_S:
        before = procs.cpu_by_process(directory)
        await asyncio.sleep(window)
        after = procs.cpu_by_process(directory)
        used = sum(seconds - before.get(pid, (name, seconds))[1] for pid, (name, seconds) in after.items())
        if used < QUIET_CPU * window:
            return time.monotonic() - started
    return None


async def _projected(db: Path, tasks: int, timeout: float) -> float:
    """When the projection's tasks table first showed all ``tasks`` throughput tasks
    completed (read-only, as ``agentctl tasks`` reads it), by ``time.perf_counter``."""
    deadline = time.perf_counter() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            [(count,)] = conn.execute("SELECT count(*) FROM tasks WHERE task_id GLOB 't[0-9]*' AND status = ?",
                                      ("completed",)).fetchall()
        now = time.perf_counter()
        if count >= tasks:
            return now
        if now > deadline:
            raise BenchError(f"the projection showed {count} of {tasks} tasks completed {timeout:g} s after the last")
        await asyncio.sleep(0.02)


async def outcomes(js: JetStreamContext, done: Completions) -> list[Any]:
    """``done``'s subscriptions to the tasks' outcomes from now on: completions, and any
    rejection or failure (which ends a measure with its reason)."""
    subs = [await js.subscribe("audit.accepted.task_completed.*", stream=subjects.AUDIT_STREAM,
                               ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, cb=done.on_completed)]
    for bad in ("audit.rejected.>", "audit.accepted.task_failed.*"):
        subs.append(await js.subscribe(bad, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.NEW, cb=done.on_bad))
    return subs


def submission(task_id: str) -> tuple[bytes, dict[str, str]]:
    event = TaskSubmitted(id=new_id(), task_id=task_id, skill="echo", input={"text": "hello"})
    return codec.encode(event), {subjects.HDR_MSG_ID: event.id}


async def _measure(system: System, tasks: int, samples: int, paused: int, profile: Path | None,
                   say: Callable[[str], None]) -> dict[str, Any]:
    cli = await connect(system.settings, CLI.token)
    js = cli.jetstream(timeout=30)
    loop = asyncio.get_running_loop()
    subject = subjects.ingress(CLI, "task_submitted")
    started = time.monotonic()
    await joined(js, system.agents, timeout=180)
    say(f"  {len(system.agents)} agents joined {time.monotonic() - started:.1f} s after honcho start")
    quiet = await until_quiet(system.dir)
    say(f"  the system was quiet {quiet:.1f} s later" if quiet is not None
        else f"  the system was still busy {QUIET_WAIT_S:g} s after the agents joined; measuring anyway")
    done = Completions()
    stamping = await js.subscribe("audit.accepted.task_submitted.*", stream=subjects.AUDIT_STREAM,
                                  ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, cb=done.on_submitted)
    subs = [stamping, *await outcomes(js, done)]
    try:
        latencies, sent = [], {}
        for i in range(WARMUP + samples):
            if i == WARMUP:
                cpu_before = procs.cpu_by_process(system.dir)
            task_id = f"lat{i}"
            done.waiting[task_id] = fut = loop.create_future()
            if i >= WARMUP:
                done.sampled.add(task_id)
            data, headers = submission(task_id)
            wall, start = time.time(), time.perf_counter()
            await js.publish(subject, data, headers=headers)
            end = await done.until(fut, timeout=60)
            if i >= WARMUP:
                latencies.append(end - start)
                sent[task_id] = wall
        cpu_alone = procs.cpu_spent(cpu_before, procs.cpu_by_process(system.dir), samples)
        await done.stamped(list(sent))
        split = [hops(at, done.stamps["task_submitted", t], done.stamps["task_completed", t]) for t, at in sent.items()]
        after_pause = []
        for i, pause in enumerate(pauses(paused)):
            await asyncio.sleep(pause)
            done.waiting[f"paused{i}"] = fut = loop.create_future()
            data, headers = submission(f"paused{i}")
            start = time.perf_counter()
            await js.publish(subject, data, headers=headers)
            after_pause.append(await done.until(fut, timeout=60) - start)
        # The throughput step's submissions are not stamped: this client reads only their results.
        subs.remove(stamping)
        await stamping.unsubscribe()
        payloads = [submission(f"t{i}") for i in range(tasks)]
        done.count, done.target = 0, tasks
        done.all_done = loop.create_future()
        spy = _start_profiler(system, profile, say) if profile else None
        cpu_before = procs.cpu_by_process(system.dir)
        start = time.perf_counter()
        publisher = await Publisher(cli).start()
        acks = await publisher.publish([(subject, data, headers) for data, headers in payloads], timeout=60)
        failed = [a for a in acks if isinstance(a, BaseException)]
        submitted = time.perf_counter() - start
        if failed:
            raise BenchError(f"{len(failed)} of {tasks} submissions got no PubAck: {failed[0]}")
        end = await done.until(done.all_done, timeout=120 + tasks * 0.1)
        projected = await _projected(system.dir / "var" / "ledgerbus.db", tasks, timeout=60)
        result: dict[str, Any] = {"projection_lag_s": projected - end, "hops_ms": hop_percentiles(split),
                                  "cpu_ms_per_task_alone": cpu_alone}
        result["cpu_ms_per_task"] = procs.cpu_spent(cpu_before, procs.cpu_by_process(system.dir), tasks)
        if spy is not None and profile is not None:
            result["profile"] = _stop_profiler(spy, profile, say)
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await cli.close()
    elapsed = end - start
    return result | {
        "tasks_per_s": tasks / elapsed,
        "seconds": elapsed,
        "submitted_per_s": tasks / submitted,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    } | ({"paused_p50_ms": statistics.median(after_pause) * 1000} if after_pause else {})


def run_ledgerbus(repo: Path, tasks: int, samples: int, traced: bool, say: Callable[[str], None],
                  profile: Path | None = None, every_trace: bool = False, paused: int = 0) -> dict[str, Any]:
    """One run of the shipped system under honcho: latency, after a pause, then throughput."""
    system = System(repo, traced, every_trace)
    try:
        system.start()
        try:
            result = asyncio.run(_measure(system, tasks, samples, paused, profile, say))
        except (BenchError, TimeoutError, OSError, nats.errors.Error) as exc:
            raise BenchError(f"ledgerbus run failed: {exc}\n--- honcho log, last lines ---\n"
                             f"{procs.tail(system.log_path)}") from exc
        finally:
            notes = system.stop()
        result["notes"] = notes
        return result
    finally:
        system.close()


# -- profile -------------------------------------------------------------------------------


def _start_profiler(system: System, out: Path, say: Callable[[str], None]) -> subprocess.Popen[bytes] | None:
    pid = system.leader_pid()
    spy = SCRIPTS / "py-spy"
    if pid is None or not spy.exists():
        say(f"  profile: {'no leading router found in the honcho log' if pid is None else 'py-spy not installed'}"
            " - going on without it")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    # --nonblocking: read the router's stacks without pausing it, so sampling does not slow it.
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                             "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=(out.with_suffix(".log")).open("wb"), start_new_session=True)


def _stop_profiler(spy: subprocess.Popen[bytes], out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    procs.stop(spy, signal.SIGINT, 30, "py-spy")
    if spy.returncode != 0 or not out.exists() or not out.stat().st_size:
        say(f"  profile: py-spy failed (exit {spy.returncode}; it needs ptrace, e.g. root or "
            f"CAP_SYS_PTRACE): {procs.tail(out.with_suffix('.log'), 3)} - going on without it")
        return {"error": procs.tail(out.with_suffix(".log"), 3)}
    return top_functions(out.read_text())


def top_functions(collapsed: str, lines: int = 15) -> dict[str, Any]:
    """The functions most often on top of the stack (self) in py-spy's raw (collapsed)
    output, with the share of samples each was anywhere on the stack (total)."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            anywhere[frame] = anywhere.get(frame, 0) + count
    top = sorted(own, key=own.__getitem__, reverse=True)[:lines]
    return {"samples": samples, "top": [{"function": f, "self_pct": 100 * own[f] / max(samples, 1),
                                         "total_pct": 100 * anywhere[f] / max(samples, 1)} for f in top]}


def _median_cpu(rounds: list[dict[str, Any]], key: str = "cpu_ms_per_task") -> dict[str, float]:
    """Per process, the median over the rounds of its CPU milliseconds per task (``key``)."""
    names = {name for r in rounds for name in r.get(key, {})}
    cpu = {name: statistics.median(r.get(key, {}).get(name, 0.0) for r in rounds) for name in names}
    return dict(sorted(((k, v) for k, v in cpu.items() if v >= 0.01), key=lambda kv: -kv[1]))


def _round_ratios(per_round: dict[str, list[dict[str, Any]]], of: str, to: str,
                  measure: Callable[[dict[str, Any]], float]) -> list[float]:
    """``measure`` of ``of`` over that of ``to``, round by round: the two ran one after
    the other in each round, so a machine that got busier or quieter between rounds moves
    both (the ratio of the medians mixes rounds)."""
    return [measure(a) / measure(b) for a, b in zip(per_round[of], per_round[to], strict=True) if measure(b) > 0]


def _cpu_all(found: dict[str, Any]) -> float:
    return sum(found.get("cpu_ms_per_task", {}).values())


# -- rounds --------------------------------------------------------------------------------

MEDIANS = ("tasks_per_s", "p50_ms", "p99_ms", "paused_p50_ms")
"""What each system's rounds are reduced to (``paused_p50_ms`` only when measured)."""


def run(repo: Path, tasks: int, samples: int, rounds: int, profile: Path | None = None,
        say: Callable[[str], None] = print, paused: int = 0) -> dict[str, Any]:
    """Every system ``rounds`` times, alternating; medians, ratios, and each round."""
    skip = celery_side.missing()
    if skip:
        say(f"[bold]Celery side skipped[/]: {skip}. ledgerbus is still measured.")
    systems = [s for s in SYSTEMS if s != "celery" or not skip]
    per_round: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(rounds):
        for name in systems if r % 2 == 0 else list(reversed(systems)):
            say(f"round {r + 1}/{rounds}: {name} ...")
            if name == "celery":
                found = celery_side.run(repo, tasks, samples, say, paused)
            else:
                found = run_ledgerbus(repo, tasks, samples, traced=name != "ledgerbus-untraced", say=say,
                                      every_trace=name == "ledgerbus-every-trace", paused=paused)
            per_round[name].append(found)
            say(f"round {r + 1}/{rounds}: {name:<18} {found['tasks_per_s']:>8,.0f} tasks/s   "
                f"p50 {found['p50_ms']:6.2f} ms   p99 {found['p99_ms']:6.2f} ms"
                + (f"   after a pause p50 {found['paused_p50_ms']:6.2f} ms" if "paused_p50_ms" in found else ""))
            if "projection_lag_s" in found:
                say(f"  the projection showed all {tasks:,} completed {found['projection_lag_s'] * 1000:.0f} ms "
                    "after the client saw the last")
            if "hops_ms" in found:
                say("  one at a time, p50 ms by hop: " + ", ".join(f"{hop} {v['p50']:.2f}"
                                                                   for hop, v in found["hops_ms"].items()))
            if found.get("cpu_ms_per_task"):
                say("  CPU ms per task: " + ", ".join(f"{k} {v:.2f}" for k, v in found["cpu_ms_per_task"].items()
                                                      if v >= 0.01))
            if found.get("cpu_ms_per_task_alone"):
                say("  one at a time, CPU ms per task: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in found["cpu_ms_per_task_alone"].items() if v >= 0.01))
            for note in found["notes"]:
                say(f"  [yellow]note[/]: {note}")
    medians = {s: {k: statistics.median(x[k] for x in found) for k in MEDIANS if all(k in x for x in found)}
               for s, found in per_round.items()}
    result: dict[str, Any] = {
        "tasks": tasks, "latency_samples": samples, "paused_samples": paused, "rounds": rounds,
        "median": medians,
        "rounds_detail": per_round,
        "traced_over_untraced": medians["ledgerbus"]["tasks_per_s"] / medians["ledgerbus-untraced"]["tasks_per_s"],
        "traced_over_untraced_rounds": _round_ratios(per_round, "ledgerbus", "ledgerbus-untraced",
                                                     lambda r: r["tasks_per_s"]),
        # CPU per task over every process, untraced over traced: what tracing costs the
        # machine, however busy it was (throughput also moves with the neighbours' load).
        "untraced_over_traced_cpu_rounds": _round_ratios(per_round, "ledgerbus-untraced", "ledgerbus", _cpu_all),
        "every_trace_over_untraced": (medians["ledgerbus-every-trace"]["tasks_per_s"]
                                      / medians["ledgerbus-untraced"]["tasks_per_s"]),
        "cpu_ms_per_task": {s: _median_cpu(found) for s, found in per_round.items() if s != "celery"},
        "cpu_ms_per_task_alone": {s: _median_cpu(found, "cpu_ms_per_task_alone") for s, found in per_round.items()
                                  if s != "celery"},
        "projection_lag_s": {s: statistics.median(r["projection_lag_s"] for r in found)
                             for s, found in per_round.items() if s != "celery"},
        "hops_ms": {s: {hop: {p: statistics.median(r["hops_ms"][hop][p] for r in found) for p in ("p50", "p99")}
                        for hop in HOPS} for s, found in per_round.items() if s != "celery"},
        "celery_skipped": skip,
    }
    if not skip:
        celery = medians["celery"]
        result["ledgerbus_over_celery"] = {
            "tasks_per_s": medians["ledgerbus"]["tasks_per_s"] / celery["tasks_per_s"],
            "untraced_tasks_per_s": medians["ledgerbus-untraced"]["tasks_per_s"] / celery["tasks_per_s"],
            "p50_ms": medians["ledgerbus"]["p50_ms"] / celery["p50_ms"],
            "p99_ms": medians["ledgerbus"]["p99_ms"] / celery["p99_ms"],
        }
        result["p50_over_celery_rounds"] = _round_ratios(per_round, "ledgerbus", "celery", lambda r: r["p50_ms"])
        if "paused_p50_ms" in medians["ledgerbus"] and "paused_p50_ms" in celery:
            result["ledgerbus_over_celery"]["paused_p50_ms"] = (medians["ledgerbus"]["paused_p50_ms"]
                                                                / celery["paused_p50_ms"])
    if profile is not None:
        say("profile: one more traced ledgerbus run (not counted), py-spy on the leading router ...")
        found = run_ledgerbus(repo, tasks, samples, traced=True, say=say, profile=profile)
        result["profile"] = found.get("profile", {"error": "no profile taken"}) | {
            "file": str(profile), "tasks_per_s": found["tasks_per_s"]}
    return result
