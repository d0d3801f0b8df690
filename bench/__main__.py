"""``python -m bench [--only router|projections|scaling|fsync|e2e|coldstart|soak] [--messages N] [--rounds R]
[--tasks T] [--events E] [--sleep-tasks N] [--sleep S] [--replicas 1,2,4] [--fsync-messages N]
[--fsync-sequential M] [--e2e-tasks N] [--e2e-samples M] [--e2e-paused P] [--e2e-paired K]
[--coldstart-records 100000,1000000] [--profile]
[--plot PNG] [--soak-messages N] [--soak-sample-s S] [--soak-window T] [--soak-rate R] [--soak-audit-max-bytes B]
[--soak-audit-max-age D] [--soak-segment-records N] [--soak-archive-max-age D] [--soak-check-every D]
[--soak-no-retention] [--soak-flat-pct P] [--soak-csv CSV] [--soak-plot PNG] [--write-docs [--docs MD]]``

1. Router throughput vs a bare relay. Both drain the same N preloaded submissions from
   INGRESS through the same JetStream work: fetch, one AUDIT write and one WORK write per
   message, ack. The relay does nothing else; the router also decodes, checks, seals the
   hash chain and folds its state. router/relay is the cost of the router's own logic;
   each side's CPU per message (this process, every thread) says the same more steadily.
   The router also runs with only the subject and schema checks (``FLOOR_CHECKS``): what
   it does per message besides the checks, so floor/relay bounds what faster checks can win.
   The router also runs traced as in production (every span recorded and published to
   TRACES, flushed before the clock stops), with a span per check and with
   LEDGERBUS_TRACE_CHECKS=failed; the plain run traces as shipped (each message starts a
   trace, at most 50 a second are sampled, and the others' spans skip the SDK, as
   configure_telemetry sets it up), so traced/plain is the cost of recording every span.
2. Task latency vs a PubAck. T sequential echo tasks, submit to completed record, through
   the router and an agent (both in this process), beside the round trip of one JetStream
   publish on the same server.
3. Projection rebuild rate vs raw sqlite3 executemany of the same rows, for E mixed
   events (see bench/projections.py).
4. Sleep-bound throughput with 2 and 4 replicas of one agent vs 1 replica: N sleep tasks
   of S seconds, each replica concurrency 1 (see bench/scaling.py).
5. What fsyncing every write costs: publish throughput and PubAck latency to INGRESS with
   ``sync_interval`` by default and ``always``, on one server and on the three-node cluster
   of nats-cluster/ (R3), vs one server by default (see bench/fsync.py).
6. The whole system as a user compares it: ``honcho start`` as shipped (traced, and with
   OTEL_SDK_DISABLED=true) beside Celery with Redis, N no-op tasks pipelined and M one at a
   time, rounds alternating (see bench/e2e.py; needs ``uv sync --extra bench``); then K
   lone tasks a side with both systems up, in blocks taking turns (bench/paired.py).
7. Router cold start as the audit log grows, from a snapshot and folding the whole log, on
   one log grown by the real router and an echo agent (see bench/coldstart.py).
8. A soak, only with ``--only soak``: ``honcho start`` as shipped with a ``[retention]``
   table in policy.toml routes N messages (N / 2 echo tasks) while the processes' RSS and
   the disk use of the store, the projection and the archive are sampled (see
   bench/soak.py; a CSV, a plot, and with ``--write-docs`` its section of docs/benchmarks.md).

Every round uses a fresh nats-server (or cluster); medians are reported because these machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from nats.aio.client import Client
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler, SamplingResult
from rich.console import Console
from rich.table import Table

from bench import coldstart, e2e, e2e_report, fsync, paired, projections, scaling, soak, soak_report
from ledgerbus.agents.runtime import Agent
from ledgerbus.bus import codec, heap, pull, subjects, tracing
from ledgerbus.bus.archive import parse_duration, parse_size
from ledgerbus.bus.connection import connect
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.identity import identity, write_local_config
from ledgerbus.bus.logs import configure_logging
from ledgerbus.bus.provision import provision, router_consumer_config
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from ledgerbus.bus.tracing import BUS_QUEUE, BusSpanExporter
from ledgerbus.plugins.echo import EchoSkill
from ledgerbus.router.app import Router
from ledgerbus.router.checks import Check, principal, schema

REPO = Path(__file__).resolve().parent.parent
CLI = subjects.principal("cli", "bench")
PRINCIPALS = [identity("admin"), identity("router"), identity("cli", "bench"), identity("agent", "bench", ["echo"]),
              scaling.PRINCIPAL]
console = Console()


async def preload(settings: Settings, n: int) -> None:
    cli = await connect(settings, CLI.token)
    js = cli.jetstream(timeout=30)
    subject = subjects.ingress(CLI, "task_submitted")
    futures = []
    for i in range(n):
        event = TaskSubmitted(id=new_id(), task_id=f"t{i}", skill="echo", input={"i": i, "text": "hello"})
        futures.append(await js.publish_async(subject, codec.encode(event)))
    await asyncio.gather(*futures)
    await cli.close()


async def drained(nc: Client, n: int) -> None:
    js = nc.jetstream()
    while (await js.stream_info(subjects.WORK_STREAM)).state.messages < n or (
        await js.stream_info(subjects.INGRESS_STREAM)
    ).state.messages:
        await asyncio.sleep(0.01)


class Switch(Sampler):
    """Samples everything while ``on``, and as shipped otherwise (at most
    ``LEDGERBUS_TRACE_RATE``'s default of new traces a second): one tracer provider per
    process (OpenTelemetry allows no other) serves the traced runs and the one as shipped."""

    shipped = tracing.RateLimitedRoots(tracing.RateLimited(tracing.DEFAULT_TRACE_RATE))
    on = False

    def should_sample(self, *args, **kwargs) -> SamplingResult:  # type: ignore[no-untyped-def]
        return (ALWAYS_ON if self.on else self.shipped).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "bench switch"

    def turn(self, on: bool) -> None:
        """Sample everything, or as shipped, where unsampled spans skip the SDK
        (configure_telemetry's fast path, :func:`tracing.start_span`)."""
        self.on = on
        tracing.skip_sdk_when_unsampled(None if on else PROVIDER, self.shipped)


SWITCH = Switch()
PROVIDER = TracerProvider(sampler=SWITCH, resource=Resource.create({"service.name": "ledgerbus-router"}))
EXPORTER = BusSpanExporter(PROVIDER.resource)
# As configure_telemetry sets it up.
PROVIDER.add_span_processor(BatchSpanProcessor(EXPORTER, schedule_delay_millis=250, max_queue_size=BUS_QUEUE))


class Drained(NamedTuple):
    """One side's run: messages a second, and this process's CPU (every thread) per message
    over the same interval, which a busy neighbour moves less than the rate."""

    rate: float
    cpu_us: float


async def run_router(settings: Settings, n: int, traced: bool = False, checks: str | None = None,
                     pipeline: list[Check] | None = None) -> Drained:
    """The router draining ``n`` preloaded submissions: as shipped (``LEDGERBUS_TRACE_CHECKS``'s
    default), or with ``checks`` ("all": a span per check of a recorded message); with
    ``pipeline``, running those checks instead of the shipped ones."""
    if checks is not None:
        settings = settings.replace(trace_checks=checks)
    nc = await connect(settings, "router")
    router = Router(nc, settings, pipeline)
    await router.start()
    SWITCH.turn(traced)
    if traced:
        EXPORTER.attach(nc, "router")
    stop = asyncio.Event()
    start, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(router.run(stop))
    await drained(nc, n)
    if traced:
        await asyncio.to_thread(PROVIDER.force_flush)
        await EXPORTER.flush()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    SWITCH.turn(False)
    stop.set()
    await task
    EXPORTER.detach()
    await nc.close()
    return Drained(n / elapsed, cpu / n * 1e6)


async def run_traced_router(settings: Settings, n: int) -> Drained:
    return await run_router(settings, n, traced=True, checks="all")


async def run_traced_failed_checks(settings: Settings, n: int) -> Drained:
    return await run_router(settings, n, traced=True, checks="failed")


FLOOR_CHECKS: list[Check] = [principal.check, schema.check]
"""The checks no router can leave out: who sent it (every record names a principal) and
what it is (every record holds the decoded event)."""


async def run_router_floor(settings: Settings, n: int) -> Drained:
    """The router with only :data:`FLOOR_CHECKS`: everything else it does per message (the
    record, the chain, the state, the span, the work item and its token) at full cost. Its
    distance from the relay is what no work on the other checks can win back."""
    return await run_router(settings, n, pipeline=FLOOR_CHECKS)


async def run_relay(settings: Settings, n: int) -> Drained:
    """The same JetStream work as the router, with the same client code (``bus/pull.py``,
    ``bus/publish.py``), and nothing else."""
    nc = await connect(settings, "router")
    js = nc.jetstream(timeout=30)
    await provision(js, settings)
    puller = await pull.durable(nc, js, subjects.INGRESS_STREAM, router_consumer_config(settings))
    publisher = await Publisher(nc).start()
    start, cpu = time.perf_counter(), time.process_time()
    done, seq = 0, 0
    while done < n:
        msgs = await puller.pull(settings.router_batch, 5)
        audits = []
        for msg in msgs:
            seq += 1
            audits.append(("audit.accepted.task_submitted.x", msg.data, {subjects.HDR_EXPECTED_LAST_SEQ: str(seq - 1)}))
        await publisher.publish(audits)
        await publisher.publish([("work.echo", msg.data, {subjects.HDR_MSG_ID: f"w{seq}-{i}"})
                                 for i, msg in enumerate(msgs)])
        for msg in msgs:
            await msg.ack()
        done += len(msgs)
    await drained(nc, n)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await puller.close()
    await nc.close()
    return Drained(n / elapsed, cpu / n * 1e6)


async def latency(settings: Settings, tasks: int) -> tuple[list[float], list[float]]:
    router_nc = await connect(settings, "router")
    agent_nc = await connect(settings, "agent-bench")
    cli = await connect(settings, CLI.token)
    router = Router(router_nc, settings)
    await router.start()
    stop = asyncio.Event()
    runners = [asyncio.create_task(router.run(stop)),
               asyncio.create_task(Agent(agent_nc, settings, "bench", {"echo": EchoSkill()}).run(stop))]
    js = cli.jetstream(timeout=30)
    done: dict[str, asyncio.Future[None]] = {}

    async def on_record(msg) -> None:  # type: ignore[no-untyped-def]
        record = codec.decode_record(msg.data)
        if record.kind == "task_completed" and record.key in done:
            done[record.key].set_result(None)

    follow = await js.subscribe("audit.accepted.task_completed.*", stream=subjects.AUDIT_STREAM,
                                ordered_consumer=True, cb=on_record)
    subject = subjects.ingress(CLI, "task_submitted")
    samples, acks = [], []
    for i in range(tasks + 10):  # the first ten warm up
        task_id = f"lat{i}"
        done[task_id] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        await js.publish(subject, codec.encode(TaskSubmitted(id=new_id(), task_id=task_id, skill="echo")))
        ack = time.perf_counter() - start
        await done[task_id]
        if i >= 10:
            samples.append(time.perf_counter() - start)
            acks.append(ack)
    await follow.unsubscribe()
    stop.set()
    await asyncio.gather(*runners)
    for nc in (router_nc, agent_nc, cli):
        await nc.close()
    return samples, acks


async def fresh_server(body):  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        config = write_local_config(Path(tmp) / "conf", REPO / "nats.conf", PRINCIPALS)
        async with NatsServer(Path(tmp) / "js", config=config) as server:
            settings = Settings(url=server.url, db_path=Path(tmp) / "p.db", connect_timeout_s=10,
                                auth_dir=config.parent / "var" / "auth", policy_path=Path(tmp) / "policy.toml",
                                router_key_path=Path(tmp) / "keys" / "router.key")
            admin = await connect(settings, "admin")
            await provision(admin.jetstream(), settings)
            await admin.close()
            return await body(settings)


async def main(messages: int, rounds: int, tasks: int) -> dict:
    rates: dict[str, list[float]] = {"router": [], "relay": [], "floor": [], "traced": [], "traced-f": []}
    cpu_us: dict[str, list[float]] = {name: [] for name in rates}
    trace.set_tracer_provider(PROVIDER)
    SWITCH.turn(False)
    for r in range(rounds):
        # Alternate the order so neither side always runs on a warmer machine.
        order = [("relay", run_relay), ("router", run_router), ("floor", run_router_floor),
                 ("traced", run_traced_router), ("traced-f", run_traced_failed_checks)]
        for name, fn in order if r % 2 else reversed(order):
            async def body(settings: Settings, fn=fn) -> Drained:  # type: ignore[no-untyped-def]
                await preload(settings, messages)
                heap.settle()  # as agentctl's processes do once started, for both sides
                return await fn(settings, messages)
            run = await fresh_server(body)
            rates[name].append(run.rate)
            cpu_us[name].append(run.cpu_us)
            console.print(f"round {r + 1}/{rounds}: {name:<8} {run.rate:>9,.0f} msg/s  {run.cpu_us:>5,.0f} µs of CPU a "
                          "message")
    router_rates, relay_rates, traced_rates = rates["router"], rates["relay"], rates["traced"]
    lat, acks = await fresh_server(lambda s: latency(s, tasks))
    result = {
        "messages": messages,
        "rounds": rounds,
        "router_msgs_per_s": statistics.median(router_rates),
        "relay_msgs_per_s": statistics.median(relay_rates),
        "router_over_relay": statistics.median(router_rates) / statistics.median(relay_rates),
        "router_cpu_us_per_msg": statistics.median(cpu_us["router"]),
        "relay_cpu_us_per_msg": statistics.median(cpu_us["relay"]),
        # The relay's CPU over the router's, round by round (the two ran one after the other).
        "relay_over_router_cpu": statistics.median(b / a for a, b in zip(cpu_us["router"], cpu_us["relay"],
                                                                         strict=True)),
        "floor_msgs_per_s": statistics.median(rates["floor"]),
        "floor_over_relay": statistics.median(rates["floor"]) / statistics.median(relay_rates),
        "floor_cpu_us_per_msg": statistics.median(cpu_us["floor"]),
        "relay_over_floor_cpu": statistics.median(b / a for a, b in zip(cpu_us["floor"], cpu_us["relay"], strict=True)),
        "traced_router_msgs_per_s": statistics.median(traced_rates),
        "traced_over_shipped": statistics.median(traced_rates) / statistics.median(router_rates),
        "traced_failed_checks_msgs_per_s": statistics.median(rates["traced-f"]),
        "traced_failed_checks_over_shipped": statistics.median(rates["traced-f"]) / statistics.median(router_rates),
        "tasks": tasks,
        "task_latency_ms_p50": statistics.median(lat) * 1000,
        "task_latency_ms_p95": statistics.quantiles(lat, n=20)[-1] * 1000,
        "puback_ms_p50": statistics.median(acks) * 1000,
        "latency_over_puback": statistics.median(lat) / statistics.median(acks),
    }
    return result


def _whole(value: str, least: int) -> int:
    try:
        count = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from exc
    if count < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}: {value!r}")
    return count


def _positive(value: str) -> int:
    """A count of messages, tasks, rounds or samples: a whole number, at least 1 (a run of
    none has no median to report)."""
    return _whole(value, 1)


def _count(value: str) -> int:
    """A count that may be 0: the step it counts is then left out."""
    return _whole(value, 0)


def _paired(value: str) -> int:
    """Lone tasks a side for the paired step: 0 (left out) or at least one block."""
    count = _whole(value, 0)
    if 0 < count < paired.BLOCK:
        raise argparse.ArgumentTypeError(f"fewer than one block of {paired.BLOCK} (0 leaves the step out): {value!r}")
    return count


def _counts(value: str) -> list[int]:
    """``--replicas 2,4`` → ``[1, 2, 4]``: distinct positive counts, the baseline first."""
    try:
        counts = {int(v) for v in value.split(",") if v.strip()}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of counts: {value!r}") from exc
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"replica counts are positive: {value!r}")
    return sorted(counts | {1})


def _sizes(value: str) -> list[int]:
    """``--coldstart-records 100000,1000000`` → ``[100000, 1000000]``."""
    try:
        sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of record counts: {value!r}") from exc
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"record counts are positive: {value!r}")
    return sizes


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _duration(value: str) -> str:
    try:
        parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def run_soak(args: argparse.Namespace) -> dict:
    """``--only soak``: run it, write the CSV and the plot, print the table and the
    verdicts, and with ``--write-docs`` its section of the docs page."""
    retention = None if args.soak_no_retention else soak.Retention(
        audit_max_age=args.soak_audit_max_age, audit_max_bytes=args.soak_audit_max_bytes,
        segment_records=args.soak_segment_records, archive_max_age=args.soak_archive_max_age,
        check_every=args.soak_check_every)
    try:
        found = soak.run(REPO, args.soak_messages, args.soak_sample_s, args.soak_window, args.soak_rate, retention,
                         say=console.print)
    except e2e.BenchError as exc:
        console.print(f"soak: {exc}", style="red", markup=False, highlight=False)
        sys.exit(1)
    found["machine"] = e2e_report.machine(soak_report.PACKAGES)
    found["command"] = " ".join(["python -m bench", *map(shlex.quote, sys.argv[1:])])
    verdict = soak_report.analyse(found, args.soak_flat_pct)
    found["verdict"] = verdict
    soak_report.write_csv(found, args.soak_csv)
    console.print(f"[dim]{len(found['samples'])} samples written to {args.soak_csv}[/]")
    plot = args.soak_plot or (REPO / "docs" / "benchmarks-soak.png" if args.write_docs
                              else REPO / "bench" / "results" / "soak.png")
    why_not = soak_report.plot(found, verdict, plot, found["machine"])
    console.print(why_not or f"[dim]plot written to {plot}[/]")
    table = Table("measure", "start", "middle", "end", box=None)
    for row in soak_report.table(found):
        table.add_row(*row)
    console.print(table)
    console.print(f"{found['feed_messages']:,} messages routed in {found['feed_s']:,.0f} s: "
                  f"{found['messages_per_s']:,.0f} messages/s ({found['tasks_per_s']:,.0f} echo tasks/s, "
                  f"{found['messages_per_task']} messages each)")
    for line in soak_report.verdict_lines(found, verdict):
        console.print(f"  {line}", highlight=False)
    console.print(soak_report.summary(verdict), style="bold", highlight=False)
    for note in found["notes"] + [f"task not completed: {p}" for p in found["problems"]]:
        console.print(f"  [yellow]note[/]: {note}")
    if args.write_docs:
        link = None if why_not else Path(os.path.relpath(plot, args.docs.parent)).as_posix()
        e2e_report.write_docs(args.docs, soak_report.section(found, verdict, link), soak_report.BEGIN,
                              soak_report.END)
        console.print(f"[dim]{args.docs} updated[/]")
    return found


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["router", "projections", "scaling", "fsync", "e2e", "coldstart", "soak"],
                        help="Run one benchmark, not all (the soak runs only when named).")
    parser.add_argument("--messages", type=_positive, default=20_000)
    parser.add_argument("--rounds", type=_positive, default=3)
    parser.add_argument("--tasks", type=_positive, default=200)
    parser.add_argument("--events", type=_positive, default=100_000, help="Audit records in the projection benchmark.")
    parser.add_argument("--sleep-tasks", type=_positive, default=24, help="Sleep tasks per run in the scaling benchmark.")
    parser.add_argument("--sleep", type=float, default=0.2, help="Seconds each sleep task sleeps.")
    parser.add_argument("--replicas", type=_counts, default="1,2,4",
                        help="Replica counts to compare, comma-separated; 1 (the baseline) is always run.")
    parser.add_argument("--fsync-messages", type=_positive, default=20_000,
                        help="Messages published pipelined per configuration in the fsync benchmark.")
    parser.add_argument("--fsync-sequential", type=_positive, default=300,
                        help="Messages then published one at a time, for the PubAck latency.")
    parser.add_argument("--e2e-tasks", type=_positive, default=5000,
                        help="No-op tasks pipelined per system and round in the end-to-end benchmark.")
    parser.add_argument("--e2e-samples", type=_positive, default=300,
                        help="Tasks then run one at a time per system and round, for the latency percentiles.")
    parser.add_argument("--e2e-paused", type=_count, default=30,
                        help="Tasks then run one at a time after a pause of 0.2-0.8 s each (a person's task, every "
                             "process idle), for their p50; 0 leaves the step out.  [default: 30]")
    parser.add_argument("--e2e-paired", type=_paired, default=1000,
                        help="Then lone tasks a side with ledgerbus (as shipped) and Celery up at once, in blocks of "
                             f"{paired.BLOCK} taking turns, for the p50 ratio the machine's drift moves least "
                             "(bench/paired.py); 0 leaves the step out.  [default: 1000]")
    parser.add_argument("--coldstart-records", type=_sizes, default="100000,1000000",
                        help="Audit log sizes at which the router's cold start is measured, with and without "
                             "snapshots (one log, grown in turn).  [default: 100000,1000000]")
    parser.add_argument("--profile", action="store_true",
                        help="End-to-end: one more traced ledgerbus run with py-spy on the leading router; "
                             "prints the profile's top lines (raw stacks in bench/results/router-profile.txt).")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "benchmarks-e2e.png",
                        help="Where the end-to-end benchmark draws its plot.  [default: docs/benchmarks-e2e.png]")
    soak_args = parser.add_argument_group("soak (--only soak)")
    soak_args.add_argument("--soak-messages", type=_positive, default=1_000_000,
                           help="Messages routed: half as many echo tasks (two messages each).  [default: 1000000]")
    soak_args.add_argument("--soak-sample-s", type=float, default=5.0, help="Seconds between samples.  [default: 5]")
    soak_args.add_argument("--soak-window", type=_positive, default=1000,
                           help="Tasks submitted and not yet settled, at most (back-pressure).  [default: 1000]")
    soak_args.add_argument("--soak-rate", type=float, default=0.0,
                           help="Tasks per second, at most (0: as fast as the window allows).  [default: 0]")
    soak_args.add_argument("--soak-audit-max-bytes", type=_size, default="32MiB",
                           help="[retention] audit_max_bytes (written as a number of bytes).  [default: 32MiB]")
    soak_args.add_argument("--soak-audit-max-age", type=_duration, default="7d",
                           help="[retention] audit_max_age.  [default: 7d, as shipped: it does not bite here]")
    soak_args.add_argument("--soak-segment-records", type=_positive, default=10_000,
                           help="[retention] segment_records.  [default: 10000]")
    soak_args.add_argument("--soak-archive-max-age", type=_duration, default="3m",
                           help="[retention] archive_max_age.  [default: 3m]")
    soak_args.add_argument("--soak-check-every", type=_duration, default="5s",
                           help="[retention] check_every.  [default: 5s]")
    soak_args.add_argument("--soak-no-retention", action="store_true",
                           help="No [retention] table: soak without the rule (AUDIT is then unbounded).")
    soak_args.add_argument("--soak-flat-pct", type=float, default=5.0,
                           help="RSS growth over the second half below which it is called flat.  [default: 5]")
    soak_args.add_argument("--soak-csv", type=Path, default=REPO / "bench" / "results" / "soak.csv",
                           help="Where the samples go.  [default: bench/results/soak.csv]")
    soak_args.add_argument("--soak-plot", type=Path, default=None,
                           help="Where the plot goes.  [default: docs/benchmarks-soak.png with --write-docs, "
                                "else bench/results/soak.png]")
    parser.add_argument("--write-docs", action="store_true",
                        help="Write the end-to-end (or soak) results into their section of the --docs page.")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="The page --write-docs updates.  [default: docs/benchmarks.md]")
    args = parser.parse_args()
    configure_logging("console", "error")
    result: dict = {}
    table = Table("measure", "ledgerbus", "baseline (same run)", "ratio", box=None)
    if args.only in (None, "router"):
        result.update(asyncio.run(main(args.messages, args.rounds, args.tasks)))
        table.add_row("throughput, msg/s (median)", f"{result['router_msgs_per_s']:,.0f} router, as shipped",
                      f"{result['relay_msgs_per_s']:,.0f} bare relay", f"{result['router_over_relay']:.2f}")
        table.add_row("CPU per message, µs (median)", f"{result['router_cpu_us_per_msg']:,.0f} router, as shipped",
                      f"{result['relay_cpu_us_per_msg']:,.0f} bare relay",
                      f"{result['relay_over_router_cpu']:.2f} (relay / router, each round's own)")
        table.add_row("  with two checks (subject, schema)", f"{result['floor_msgs_per_s']:,.0f} router, two checks",
                      f"{result['relay_msgs_per_s']:,.0f} bare relay",
                      f"{result['floor_over_relay']:.2f} (CPU {result['floor_cpu_us_per_msg']:,.0f} µs a message; "
                      f"relay / floor {result['relay_over_floor_cpu']:.2f})")
        table.add_row("traced throughput, msg/s (median)", f"{result['traced_router_msgs_per_s']:,.0f} router, traced",
                      f"{result['router_msgs_per_s']:,.0f} router, as shipped", f"{result['traced_over_shipped']:.2f}")
        table.add_row("traced, failed checks only", f"{result['traced_failed_checks_msgs_per_s']:,.0f} router, traced",
                      f"{result['router_msgs_per_s']:,.0f} router, as shipped",
                      f"{result['traced_failed_checks_over_shipped']:.2f}")
        table.add_row("task latency, ms (p50)", f"{result['task_latency_ms_p50']:.2f} submit→completed "
                      f"(p95 {result['task_latency_ms_p95']:.2f})", f"{result['puback_ms_p50']:.2f} one PubAck",
                      f"{result['latency_over_puback']:.1f}")
    if args.only in (None, "projections"):
        proj = asyncio.run(projections.run(args.events, args.rounds, 1024, say=console.print))
        result["projections"] = proj
        table.add_row(f"projection rebuild, events/s (median, {proj['events']:,} mixed)",
                      f"{proj['rebuild_events_per_s']:,.0f} rebuild",
                      f"{proj['raw_events_per_s']:,.0f} raw executemany", f"{proj['rebuild_over_raw']:.2f}")
        table.add_row("  each round's own ratio (median)", "", "", f"{proj['median_round_ratio']:.2f}")
    if args.only in (None, "scaling"):
        scale = asyncio.run(scaling.run(args.sleep_tasks, args.sleep, args.replicas, args.rounds, fresh_server,
                                        say=console.print))
        result["scaling"] = scale
        one = scale["tasks_per_s"]["1"]
        for count in args.replicas[1:]:
            table.add_row(f"sleep-bound tasks/s (median, {scale['tasks']} × {scale['sleep_s']:g} s)",
                          f"{scale['tasks_per_s'][str(count)]:.2f} with {count} replicas", f"{one:.2f} with 1 replica",
                          f"{scale['over_one_replica'][str(count)]:.2f}")
    if args.only in (None, "fsync"):
        sync = asyncio.run(fsync.run(args.fsync_messages, args.fsync_sequential, args.rounds, PRINCIPALS, REPO,
                                     say=console.print))
        result["fsync"] = sync
        base = f"{sync['msgs_per_s']['single-default']:,.0f} one server, default sync"
        base_rtt = f"{sync['puback_ms_p50']['single-default']:.2f} one server, default sync"
        for name, label in (("single-always", "one server, sync always"),
                            ("cluster-default", "3 nodes R3, default sync"),
                            ("cluster-always", "3 nodes R3, sync always")):
            table.add_row("publish throughput, msg/s (median)", f"{sync['msgs_per_s'][name]:,.0f} {label}", base,
                          f"{sync['throughput_over_single_default'][name]:.2f}")
            table.add_row("PubAck latency, ms (p50)", f"{sync['puback_ms_p50'][name]:.2f} {label}", base_rtt,
                          f"{sync['puback_over_single_default'][name]:.2f}")
    if args.only in (None, "coldstart"):
        cold = asyncio.run(coldstart.run(args.coldstart_records, args.rounds, PRINCIPALS, REPO, say=console.print))
        result["coldstart"] = cold
        (REPO / "bench" / "results").mkdir(exist_ok=True)
        (REPO / "bench" / "results" / "coldstart.json").write_text(json.dumps(cold, indent=2) + "\n")
        for c in cold["sizes"].values():
            table.add_row(f"router cold start, s (median, {c['records']:,} records)",
                          f"{c['cold_start_snapshot_s']:.2f} from a snapshot (tail {c['tail']:,})",
                          f"{c['cold_start_full_s']:.2f} whole log folded",
                          f"{c['cold_start_snapshot_s'] / c['cold_start_full_s']:.2f}")
    if args.only in (None, "e2e"):
        profile = REPO / "bench" / "results" / "router-profile.txt" if args.profile else None
        ends = e2e.run(REPO, args.e2e_tasks, args.e2e_samples, args.rounds, profile, say=console.print,
                       paused=args.e2e_paused)
        if args.e2e_paired and not ends["celery_skipped"]:
            console.print(f"one task at a time, paired: {args.e2e_paired:,} lone tasks a side, both systems up ...")
            ends["paired"] = paired.run(REPO, args.e2e_paired, paired.BLOCK, True, console.print)
        ends["machine"] = e2e_report.machine()
        ends["command"] = " ".join(["python -m bench", *map(shlex.quote, sys.argv[1:])])
        result["e2e"] = ends
        for row in e2e_report.rows(ends):
            table.add_row(*row)
        why_not = e2e_report.plot(ends, args.plot)
        console.print(why_not or f"[dim]plot written to {args.plot}[/]")
        if "profile" in ends:
            console.print("router profile, top functions by own samples:")
            console.print("\n".join(e2e_report.profile_lines(ends["profile"])), markup=False, highlight=False)
        if args.write_docs:
            link = None if why_not else Path(os.path.relpath(args.plot, args.docs.parent)).as_posix()
            e2e_report.write_docs(args.docs, e2e_report.section(ends, ends["command"], link))
            console.print(f"[dim]{args.docs} updated[/]")
    if args.only == "soak":
        result["soak"] = run_soak(args)
    else:
        console.print(table)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=2))
    console.print(f"[dim]written to {out / 'latest.json'}[/]")


if __name__ == "__main__":
    cli()
