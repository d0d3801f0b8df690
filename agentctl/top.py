"""``agentctl top``: a live dashboard of the bus: agents and their load, queue depth per
skill, tasks per second, rejections by code and the latest failures.

Everything comes from the bus with the CLI user's own rights: heartbeats from the
``agents`` bucket, queue depths from WORK's per-subject counts, and the rest from the
audit log, read back over the statistics window and then followed live.

:class:`Stats` (fed audit records) and :class:`Snapshot` (what one screen shows) know
nothing of NATS or of drawing, so they are tested on their own; :func:`collect` reads the
bus and :func:`render` draws.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ledgerbus.agentctl.common import App, cli_principal, out, run
from ledgerbus.bus import codec, lifecycle, subjects
from ledgerbus.bus.connection import connected
from ledgerbus.bus.errors import BusError, UnreadableRecord
from ledgerbus.bus.events import TASK_EVENTS, PlanSubmitted, TaskDeadLettered, TaskFailed, TaskSubmitted
from ledgerbus.bus.follow import records
from ledgerbus.bus.lifecycle import BUDGET_EXCEEDED, Shape, Status
from ledgerbus.bus.messages import Heartbeat
from ledgerbus.bus.records import AuditRecord

RECENT_S = 5.0
"""The span of the "now" rate beside the window's average."""
FAILURES_SHOWN = 10
OUTCOMES = (Status.SUBMITTED, Status.COMPLETED, Status.FAILED, Status.DEAD_LETTERED, Status.REJECTED)

_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


@dataclass(frozen=True)
class Failure:
    """A task that failed or was dead-lettered, as the audit log says."""

    at: datetime
    seq: int
    task_id: str
    kind: str
    """``task_failed``, ``task_dead_lettered`` or ``budget_exceeded``"""
    principal: str
    error: str

    def as_json(self) -> dict[str, Any]:
        """The failure as a JSON-able dict."""
        return {"at": self.at.isoformat(), "seq": self.seq, "task_id": self.task_id, "kind": self.kind,
                "principal": self.principal, "error": self.error}


@dataclass(frozen=True)
class _Tally:
    at: datetime
    outcome: Status
    code: str = ""


@dataclass(frozen=True)
class Snapshot:
    """What the dashboard shows at one moment."""

    at: datetime
    window_s: float
    agents: list[Heartbeat]
    queues: dict[str, int]
    """skill → WORK messages on ``work.<skill>`` (queued plus in flight)"""
    counts: dict[str, int]
    """each of :data:`OUTCOMES` → records of it in the window"""
    per_second: float
    """tasks completed per second, averaged over the window"""
    per_second_recent: float
    """tasks completed per second over the last :data:`RECENT_S` seconds"""
    rejections: dict[str, int]
    """rejection code → records in the window, most frequent first"""
    failures: list[Failure]
    """the latest failures in the window, newest first"""
    last_seq: int = 0

    def queue_rows(self) -> list[dict[str, Any]]:
        """One row per skill that has work queued or a live agent serving it."""
        skills = set(self.queues) | {s for hb in self.agents for s in hb.skills}
        return [{"skill": skill, "depth": self.queues.get(skill, 0),
                 "running": sum(hb.loads.get(skill, 0) for hb in self.agents),
                 "instances": sum(skill in hb.skills for hb in self.agents)}
                for skill in sorted(skills)]

    def as_json(self) -> dict[str, Any]:
        """The snapshot as a JSON-able dict (``--json``)."""
        return {
            "at": self.at.isoformat(),
            "window_s": self.window_s,
            "last_seq": self.last_seq,
            "agents": [{"agent": hb.agent, "instance": hb.instance, "skills": hb.skills, "load": hb.load,
                        "concurrency": hb.concurrency, "loads": hb.loads, "heartbeat_at": hb.at.isoformat(),
                        "heartbeat_age_s": round(max(0.0, (self.at - hb.at).total_seconds()), 3)}
                       for hb in self.agents],
            "queues": {row["skill"]: {k: v for k, v in row.items() if k != "skill"} for row in self.queue_rows()},
            "tasks": {**self.counts, "per_second": round(self.per_second, 3),
                      "per_second_recent": round(self.per_second_recent, 3)},
            "rejections": self.rejections,
            "recent_failures": [f.as_json() for f in self.failures],
        }


class Stats:
    """Outcomes, rejections and failures over a sliding window of the audit log.

    Feed it records in log order with :meth:`add`; :meth:`snapshot` forgets what is older
    than the window. Records are timed by the router's clock (``AuditRecord.at``), which
    follows log order, so expiry only ever looks at the oldest end.
    """

    def __init__(self, window_s: float, failures_kept: int = FAILURES_SHOWN) -> None:
        self.window_s = window_s
        self.last_seq = 0
        self._tallies: deque[_Tally] = deque()
        self._failures: deque[Failure] = deque(maxlen=failures_kept)

    def add(self, record: AuditRecord) -> None:
        """Count one audit record."""
        self.last_seq = max(self.last_seq, record.seq)
        if not record.accepted:
            self._tallies.append(_Tally(record.at, Status.REJECTED, record.code))
            return
        event = record.event
        if isinstance(event, TaskSubmitted | PlanSubmitted):
            self._tallies.append(_Tally(record.at, Status.SUBMITTED))
            return
        if not isinstance(event, TASK_EVENTS):
            return
        # What the record does to its task, as the router and the projection see it.
        match lifecycle.after(Status.RUNNING, record, Shape.TASK):
            case Status.COMPLETED:
                self._tallies.append(_Tally(record.at, Status.COMPLETED))
            case Status.FAILED | Status.DEAD_LETTERED as outcome:
                # A usage report that spends the budget is what fails its task (no task_failed follows).
                kind = BUDGET_EXCEEDED if record.code == BUDGET_EXCEEDED else record.kind
                error = (event.error if isinstance(event, TaskFailed)
                         else event.reason if isinstance(event, TaskDeadLettered) else record.reason)
                self._fail(record, outcome, event.task_id, kind, error)

    def _fail(self, record: AuditRecord, outcome: Status, task_id: str, kind: str, error: str) -> None:
        self._tallies.append(_Tally(record.at, outcome))
        self._failures.append(Failure(record.at, record.seq, task_id, kind, record.principal, error))

    def expire(self, now: datetime) -> None:
        """Forget what happened before the window that ends at ``now``."""
        start = now - timedelta(seconds=self.window_s)
        while self._tallies and self._tallies[0].at < start:
            self._tallies.popleft()
        while self._failures and self._failures[0].at < start:
            self._failures.popleft()

    def snapshot(self, now: datetime, agents: list[Heartbeat] | None = None,
                 queues: dict[str, int] | None = None) -> Snapshot:
        """The window ending at ``now``, with the agents' heartbeats and queue depths read at ``now``."""
        self.expire(now)
        counts: dict[str, int] = {str(outcome): 0 for outcome in OUTCOMES}
        counts.update(Counter(str(t.outcome) for t in self._tallies))
        rejections = Counter(t.code for t in self._tallies if t.outcome is Status.REJECTED)
        recent_span = min(RECENT_S, self.window_s)
        recent_start = now - timedelta(seconds=recent_span)
        recent = 0
        for tally in reversed(self._tallies):
            if tally.at < recent_start:
                break
            recent += tally.outcome is Status.COMPLETED
        return Snapshot(
            at=now, window_s=self.window_s,
            agents=sorted(agents or [], key=lambda hb: (hb.agent, hb.instance)),
            queues=dict(sorted((queues or {}).items())),
            counts=counts,
            per_second=counts[Status.COMPLETED] / self.window_s,
            per_second_recent=recent / recent_span,
            rejections=dict(sorted(rejections.items(), key=lambda kv: (-kv[1], kv[0]))),
            failures=list(reversed(self._failures)),
            last_seq=self.last_seq,
        )


# Reading the bus


async def heartbeats(js: JetStreamContext) -> list[Heartbeat]:
    """The live agent instances: every heartbeat in the ``agents`` bucket (its TTL has
    already dropped the instances that stopped writing)."""
    try:
        kv = await js.key_value(subjects.AGENTS_BUCKET)
    except nats.js.errors.NotFoundError:
        return []  # no agent has ever started
    watcher = await kv.watchall()
    beats = []
    try:
        while (entry := await watcher.updates(timeout=10)) is not None:
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                continue
            try:
                beats.append(_heartbeat_decoder.decode(entry.value))
            except msgspec.DecodeError:
                continue  # an agent of another version: not shown rather than fatal
    finally:
        await watcher.stop()
    return beats


async def queue_depths(js: JetStreamContext) -> dict[str, int]:
    """skill → messages on ``work.<skill>`` (WORK is a work queue: queued plus in flight)."""
    try:
        info = await js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.WORK_ALL)
    except nats.js.errors.NotFoundError:
        return {}
    prefix = subjects.WORK_ALL.removesuffix(">")
    return {subject.removeprefix(prefix): n for subject, n in (info.state.subjects or {}).items()}


async def first_seq_since(js: JetStreamContext, since: datetime) -> int:
    """The sequence of the first audit record stored at or after ``since`` (the next one
    to come if there is none).

    The statistics are then read with a consumer that starts at that sequence: nats.py's
    ordered consumer, when it resets after a gap, asks for a start sequence but keeps a
    start time, which the server refuses.
    """
    try:
        last = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
    except nats.js.errors.NotFoundError as exc:
        raise BusError("the bus has no AUDIT stream yet: start the router first") from exc
    sub = await js.subscribe(
        subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since),
    )
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
            return last + 1
        msg = await sub.next_msg(timeout=10)
        return int(msg.metadata.sequence.stream)
    finally:
        await sub.unsubscribe()


async def collect(js: JetStreamContext, stats: Stats) -> Snapshot:
    """Read the heartbeats and queue depths now and take the window's statistics with them."""
    agents, queues = await asyncio.gather(heartbeats(js), queue_depths(js))
    return stats.snapshot(datetime.now(UTC), agents, queues)


# Drawing


def load_bar(load: int, concurrency: int, width: int = 10) -> str:
    """``█████░░░░░ 1/2``: how much of an instance's concurrency is in use."""
    used = min(load, concurrency) / concurrency if concurrency > 0 else 1.0
    filled = round(width * used)
    color = "red" if used >= 1 else "yellow" if used >= 0.5 else "green"
    return f"[{color}]{'█' * filled}[/][dim]{'░' * (width - filled)}[/] {load}/{concurrency}"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m"


def _rate(per_second: float) -> str:
    return f"{per_second:.2f}" if per_second >= 1 or per_second == 0 else f"{per_second:.2g}"


def _table(title: str, *columns: str) -> Table:
    return Table(*columns, title=f"[bold]{title}[/]", title_justify="left", box=None, padding=(0, 2, 0, 0))


def _none(table: Table, what: str) -> Table:
    if not table.row_count:
        table.add_row(f"[dim]{what}[/]")
    return table


def render(snap: Snapshot, problem: str = "") -> RenderableType:
    """The dashboard for one snapshot; ``problem`` is the last refresh's error, if any."""
    head = Text.from_markup(
        f"[bold]ledgerbus top[/]  {snap.at.astimezone():%H:%M:%S}  window {snap.window_s:g}s  "
        f"log at #{snap.last_seq}" + (f"  [red]{escape(problem)}[/]" if problem else ""))

    agents = _table("Agents", "agent", "instance", "skills", "load", "heartbeat")
    for hb in snap.agents:
        # Names, codes and errors are the bus's data, never markup: a "[/]" in an error must print.
        agents.add_row(escape(hb.agent), escape(hb.instance), escape(",".join(hb.skills)),
                       load_bar(hb.load, hb.concurrency),
                       f"{_age((snap.at - hb.at).total_seconds())} ago")

    queues = _table("Queues", "skill", "depth", "running", "agents")
    for row in snap.queue_rows():
        depth = str(row["depth"]) if row["instances"] or not row["depth"] else f"[yellow]{row['depth']}[/]"
        queues.add_row(escape(row["skill"]), depth, str(row["running"]), str(row["instances"]) if row["instances"]
                       else "[yellow]none[/]")

    c = snap.counts
    tasks = _table(f"Tasks (last {snap.window_s:g}s)", "per second", f"last {min(RECENT_S, snap.window_s):g}s",
                   "submitted", "completed", "failed", "dead-lettered", "rejected")
    tasks.add_row(_rate(snap.per_second), _rate(snap.per_second_recent), str(c["submitted"]),
                  f"[green]{c['completed']}[/]", f"[red]{c['failed']}[/]" if c["failed"] else "0",
                  f"[red]{c['dead_lettered']}[/]" if c["dead_lettered"] else "0", str(c["rejected"]))

    rejections = _table("Rejections", "code", "count")
    for code, count in snap.rejections.items():
        rejections.add_row(f"[red]{escape(code)}[/]", str(count))

    failures = _table("Recent failures", "time", "task", "kind", "principal", "error")
    for f in snap.failures:
        failures.add_row(f"{f.at.astimezone():%H:%M:%S}", escape(f.task_id), f.kind, escape(f.principal),
                         escape(f.error.splitlines()[0][:100]) if f.error else "")

    return Group(head, Text(), _none(agents, "no live agents"), Text(), _none(queues, "no queues"), Text(), tasks,
                 Text(), _none(rejections, "none"), Text(), _none(failures, "none"))


# The command


@click.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="How often the screen refreshes.")
@click.option("--window", type=click.FloatRange(min=1.0, max=7 * 24 * 3600.0), default=60.0, show_default=True,
              metavar="SECONDS", help="The span of the statistics (tasks per second, counts, rejections, failures).")
@click.option("--once", is_flag=True, help="Print one snapshot as tables and exit, no live screen.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON for scripts (implies --once).")
@click.pass_obj
def top(app: App, interval: float, window: float, once: bool, as_json: bool) -> None:
    """A live dashboard of the bus: agents and their load, queue depth per skill, tasks per
    second, rejections and recent failures (Ctrl-C to quit)."""

    async def body() -> Snapshot | None:
        async with connected(app.settings, cli_principal()) as nc:
            js = nc.jetstream(timeout=10)
            stats = Stats(window)
            start = await first_seq_since(js, datetime.now(UTC) - timedelta(seconds=window))
            if once or as_json:
                async for record, _ in records(js, from_seq=start):
                    stats.add(record)
                return await collect(js, stats)
            await _live(js, stats, start, interval)
            return None

    snap = run(body)
    if snap is None:
        return
    if as_json:
        out.print_json(data=snap.as_json())
    else:
        out.print(render(snap))


async def _live(js: JetStreamContext, stats: Stats, start: int, interval: float) -> None:
    """Follow the log into ``stats`` and redraw every ``interval`` until SIGINT or SIGTERM."""
    unreadable: list[UnreadableRecord] = []
    stop = asyncio.Event()

    async def on_record(msg: Msg) -> None:
        if unreadable:
            return
        try:
            stats.add(codec.read_record(msg.metadata.sequence.stream, msg.data))
        except UnreadableRecord as exc:
            # Counting on past it would show numbers that lack it: stop and say why, as
            # every reader of the log does.
            unreadable.append(exc)
            stop.set()

    # Errors before the first screen (rights, no stream) end the command; after it, a
    # failed refresh is shown and retried, so a server restart does not end the dashboard.
    snap = await collect(js, stats)
    # A callback subscription, not a task looping on next_msg: cancelling that task can
    # come back out of Python 3.11's wait_for as a timeout, and the loop would go on.
    sub = await js.subscribe(
        subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True, cb=on_record,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with Live(render(snap), console=out, auto_refresh=False) as live:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                if stop.is_set():
                    break
                try:
                    snap, problem = await collect(js, stats), ""
                except nats.errors.Error as exc:
                    problem = f"refresh failed: {exc or type(exc).__name__}"
                    snap = stats.snapshot(datetime.now(UTC), snap.agents, snap.queues)
                live.update(render(snap, problem), refresh=True)
        if unreadable:
            raise unreadable[0]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await sub.unsubscribe()
