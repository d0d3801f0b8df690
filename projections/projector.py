"""The projector process: follows AUDIT into SQLite, in batches, and answers queries.

It reads with an ordered consumer starting at ``tracking.position + 1``; it needs no
durable consumer because the tracking row, committed with the rows, is its cursor. With no
database file (or one of another schema, set aside) it starts from the newest projection
snapshot that checks, and it saves one every ``projection_snapshot_every`` records
(``projections/snapshots.py``).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import aiosqlite
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ledgerbus.bus import codec, metrics, subjects, tracing
from ledgerbus.bus.archive import configured
from ledgerbus.bus.errors import UnreadableRecord
from ledgerbus.bus.jsmeta import ack_meta
from ledgerbus.bus.provision import wait_for_stream
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import archived, service, snapshots
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.apply import Applier
from ledgerbus.projections.errors import LogGapError, SchemaMismatch

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("ledgerbus.projector")


async def submit_msgs(applier: Applier, msgs: list[Msg]) -> None:
    """Decode a batch of AUDIT messages and hand the records to ``applier``.

    A record this version cannot decode stops the fold, never skips it: skipped here and
    applied by an upgraded rebuild, it would make the two projections differ in silence.
    The records before it are applied and committed, so the tracking row stands just
    before it and an upgraded projector resumes there; then :class:`UnreadableRecord`
    (its sequence, JSON path and likely cause) is raised. Records missing before one
    (purged from AUDIT while it was followed) stop it the same way, with
    :class:`LogGapError`.
    """
    records = []
    last = applier.position
    for msg in msgs:
        seq = ack_meta(msg).stream_seq
        try:
            snapshots.check_next(last, seq)
            records.append(codec.read_record(seq, msg.data))
        except (UnreadableRecord, LogGapError):
            await applier.submit(records)
            await applier.drain()
            raise
        last = max(last, seq)
    await applier.submit(records)


_SETTLING = frozenset(("task_completed", "task_failed", "task_cancelled", "task_dead_lettered", "task_denied"))
"""Kinds whose record settles a task: what a person waiting on it looks for."""


def _outcome(subject: str) -> bool:
    """Whether an AUDIT subject (``audit.<verdict>.<kind>.<key>``) is a rejection or a
    record that settles a task."""
    parts = subject.split(".", 3)
    return len(parts) > 2 and (parts[1] == "rejected" or parts[2] in _SETTLING)


def apply_spans(msgs: list[Msg], max_age_s: float) -> list[tuple[int, trace.Span]]:
    """A ``projector.apply`` span, with its record's sequence, for each record of the batch
    that is a task's outcome (a result, a cancel, a dead letter, a denial, or a
    rejection: the moment it becomes visible to ``agentctl tasks``), carries the context
    of a sampled trace and is younger than ``max_age_s`` (older ones' traces are gone from
    TRACES: a projector catching up on a long log does not flood it). One span per record
    would make the projector a third of what a traced task costs it. An unsampled trace
    gets no span: nothing would record it, and nothing goes on from the projector."""
    now = time.time()
    spans = []
    for msg in msgs:
        if not _outcome(msg.subject) or not msg.headers or not msg.headers.get(subjects.HDR_TRACEPARENT):
            continue
        span = tracing.start_span(tracer, "projector.apply", msg.headers)
        if not span.is_recording():
            continue
        meta = ack_meta(msg)
        if now - meta.stored_s > max_age_s:
            continue
        span.set_attributes({**tracing.messaging(msg.subject, "process"),
                             "ledgerbus.audit.seq": meta.stream_seq, "ledgerbus.batch_size": len(msgs)})
        spans.append((meta.stream_seq, span))
    return spans


class OpenSpans:
    """``projector.apply`` spans waiting for their record's commit. Each ends once the
    projector knows the commit happened (the writer's acknowledgement). A span does not
    hurry that: the projector waits for the writer only when its pipeline is full or it
    has caught up, traced or not."""

    def __init__(self) -> None:
        self._open: list[tuple[int, trace.Span]] = []

    def add(self, spans: list[tuple[int, trace.Span]]) -> None:
        self._open.extend(spans)

    def committed(self, position: int) -> None:
        """End the spans of records at or before ``position``, now in the file."""
        if self._open and self._open[0][0] <= position:
            done = [span for seq, span in self._open if seq <= position]
            self._open = [(seq, span) for seq, span in self._open if seq > position]
            for span in done:
                span.end()

    def failed(self, description: str) -> None:
        """End every open span with an error: the projector stops before their commit."""
        open_, self._open = self._open, []
        for _, span in open_:
            span.set_status(Status(StatusCode.ERROR, description))
            span.end()


async def follow(
    js: JetStreamContext, start_seq: int
) -> JetStreamContext.PushSubscription:
    """An ordered subscription to AUDIT from ``start_seq``."""
    return await js.subscribe(
        subjects.AUDIT_ALL,
        stream=subjects.AUDIT_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq),
    )


class Flow:
    """How fast records have been coming: a count of them that decays with a time constant
    of ``TAU_S``, about the records of the last ``TAU_S`` seconds."""

    TAU_S = 0.2
    BUSY_PER_S = 50.0
    """From this many records a second on, a linger gathers several into one commit."""

    def __init__(self) -> None:
        self._level = 0.0
        self._at = time.monotonic()

    def _now(self) -> float:
        now = time.monotonic()
        self._level *= math.exp(-(now - self._at) / self.TAU_S)
        self._at = now
        return self._level

    @property
    def busy(self) -> bool:
        """Whether records have been coming at ``BUSY_PER_S`` a second or more."""
        return self._now() >= self.BUSY_PER_S * self.TAU_S

    def took(self, n: int) -> None:
        self._now()
        self._level += n


async def next_batch(sub: JetStreamContext.PushSubscription, size: int, wait: float,
                     linger: float = 0.0, flow: Flow | None = None) -> list[Msg]:
    """Up to ``size`` messages: wait ``wait`` s for the first; when fewer than ``size`` are
    queued behind it and records have been coming fast (``flow`` busy), ``linger`` s more
    for others to join it; then take what is here.

    The linger is for a steady trickle, where each record came alone: measured one task at
    a time (``bench/e2e.py``'s latency step, about 550 records a second), the projector spent
    1.4-1.7 ms of CPU a task folding and committing each record by itself, beside a task path
    of 3-5 ms on two cores; with 10 ms it spent 0.5-0.6 and its writer a quarter as much,
    and the task's p50 fell by 0.7-1.9 ms in paired runs. A record after a quiet moment
    (a person's task, a test's) is not held: there is nothing to gather, only lag to add.
    """
    try:
        batch = [await sub.next_msg(timeout=wait)]
    except TimeoutError:
        return []
    if linger > 0 and sub._pending_queue.qsize() < size - 1 and (flow is None or flow.busy):
        await asyncio.sleep(linger)
    # The rest is taken as ``next_msg`` takes a message, without what it adds around each
    # (a uuid4, a task and a timer: some turns of the event loop per record; the projector
    # made 10 epoll_wait calls per task). The ordered consumer's flow control counts what
    # is left in this queue, so it sees these as delivered just the same (nats-py 2.16).
    queue = sub._pending_queue
    while len(batch) < size and not queue.empty():
        msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        queue.task_done()
        batch.append(msg)
    if flow is not None:
        flow.took(len(batch))
    return batch


class Projector:
    """Applies AUDIT to the database at ``db_path`` and serves queries from it."""

    def __init__(self, nc: Client, settings: Settings, db_path: Path | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        self.settings = settings
        self.db_path = db_path or settings.db_path
        self.position = 0
        """The last record committed to the database."""
        self.progress = service.Progress()
        self.serving = asyncio.Event()
        """Set once the query service is subscribed."""
        self.snapshots = snapshots.Saver(self.js, settings, self.db_path)
        self.from_snapshot: int | None = None
        """The position of the snapshot this start loaded, if it loaded one."""
        self.archive = configured(settings)[0]
        """Where records purged from AUDIT are (``policy.toml`` ``[retention]``)."""
        self.flow = Flow()
        """How fast AUDIT's records have been coming: whether a batch lingers for more."""

    def _set_aside(self) -> Path:
        """Move the database file (and its WAL) aside as ``<file>.old-<time>``."""
        aside = self.db_path.with_name(f"{self.db_path.name}.old-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            old = self.db_path.with_name(self.db_path.name + suffix)
            if old.exists():
                old.rename(aside.with_name(aside.name + suffix))
        return aside

    async def _restore(self, dest: Path) -> snapshots.Restored | None:
        if not self.snapshots.enabled:
            return None
        restored = await snapshots.restore(self.js, dest, self.settings.memory_list_cap)
        if restored is not None:
            self.from_snapshot = self.snapshots.saved = restored.position
        return restored

    async def _open(self) -> Applier:
        """The database to follow the log into: the file as it is; with no file, or one of
        another schema (set aside: projections are disposable), the newest snapshot that
        checks, else a new file; and for a file that fell behind AUDIT's first record, a
        snapshot past the gap, else :class:`LogGapError`."""
        cap = self.settings.memory_list_cap
        snapshots.clean_scratch(self.db_path)
        tried = not self.db_path.exists()
        if tried:
            await self._restore(self.db_path)
        try:
            applier = await Applier.open(self.db_path, cap)
        except SchemaMismatch as exc:
            aside = self._set_aside()
            log.warning("projection_rebuild", reason=str(exc), old_file=str(aside))
            tried = True
            await self._restore(self.db_path)
            applier = await Applier.open(self.db_path, cap)
        opened: Applier | None = applier
        try:
            first = (await self.js.stream_info(subjects.AUDIT_STREAM)).state.first_seq
            if applier.committed + 1 < first and not tried:
                staging = self.db_path.with_name(f"{self.db_path.name}.restoring")
                staging.unlink(missing_ok=True)
                if await self._restore(staging) is not None:
                    opened = None
                    await applier.close()
                    aside = self._set_aside()
                    log.warning("projection_behind_log", position=applier.committed, first_seq=first,
                                old_file=str(aside), from_snapshot=self.from_snapshot)
                    staging.rename(self.db_path)
                    applier = opened = await Applier.open(self.db_path, cap)
            if applier.committed + 1 < first and self.archive.manifest().last_seq < first - 1:
                snapshots.check_tail(applier.committed, first)  # neither the stream nor the archive has them
        except BaseException:
            if opened is not None:
                await opened.close()
            raise
        return applier

    async def run(self, stop: asyncio.Event) -> None:
        """Catch up, then follow the log until ``stop`` is set.

        While it catches up, it folds each batch while the writer process commits the
        one before; once it has what the stream holds, it waits for the commit, so
        queries see every record it has received.
        """
        await wait_for_stream(self.js, subjects.AUDIT_STREAM, self.settings.connect_timeout_s)
        applier = await self._open()
        async with applier:  # on an error, the writer is killed: nothing half done commits
            reader = await dbmod.open_reader(self.db_path)
            try:
                await self._follow(applier, reader, stop)
            finally:
                await self.snapshots.stop()
                await reader.close()

    async def _follow(self, applier: Applier, reader: aiosqlite.Connection, stop: asyncio.Event) -> None:
        self.position = applier.committed
        queries = await service.serve(self.nc, reader, self.progress)
        await self.nc.flush()
        self.serving.set()
        sub = await follow(self.js, self.position + 1)
        log.info("projector_started", db=str(self.db_path), position=self.position, from_snapshot=self.from_snapshot)
        spans = OpenSpans()
        try:
            while not stop.is_set():
                batch = await next_batch(sub, self.settings.projector_batch, wait=0.5,
                                         linger=self.settings.projector_linger_s, flow=self.flow)
                if batch:
                    spans.add(apply_spans(batch, self.settings.traces_max_age_s))
                    try:
                        # Behind a purge of the retention rule: what left the stream is archived.
                        await archived.submit(applier, batch, self.archive)
                        if sub.pending_msgs == 0:
                            await applier.drain()
                    except UnreadableRecord as exc:
                        self.position = applier.committed
                        log.error("audit_record_unreadable", seq=exc.seq, path=exc.problem.path,
                                  position=self.position, newer=exc.newer, error=str(exc))
                        spans.committed(applier.committed)  # those before it were committed
                        spans.failed(str(exc))
                        raise
                elif applier.writer.in_flight:
                    await applier.drain()
                spans.committed(applier.committed)
                if applier.committed > self.position:
                    metrics.projector_applied.add(applier.committed - self.position)
                    self.position = applier.committed
                    self.progress.advanced()
                    self.snapshots.maybe_save(self.position, applier.tails)
            await queries.unsubscribe()
            await sub.unsubscribe()
            self.position = await applier.drain()
            spans.committed(self.position)
        except BaseException as exc:
            spans.failed(f"{type(exc).__name__}: {exc}")
            raise
        log.info("projector_stopped", position=self.position)
