"""Metrics as Prometheus reads them: each process's snapshot on METRICS, and the one
exposition of the whole system that the gateway's ``/metrics`` serves.

Every process has, beside its TRACES exporter (:mod:`bus.tracing`), a
:class:`SnapshotPublisher`: every ``LEDGERBUS_METRICS_INTERVAL_S`` it renders what the
process's meter provider recorded in the Prometheus text format, through the OpenTelemetry
Prometheus exporter (so the names are the specification's: dots become underscores, the
unit a suffix, a counter ends in ``_total``), and publishes it on
``metrics.<principal>.<instance>``. METRICS keeps one message per subject: the latest
snapshot of each process. :func:`scrape` reads them, drops those older than three of their
publisher's intervals (a process that died) and :func:`merge` makes one exposition of them,
every sample labelled with the process it came from, followed by gauges of the streams'
and WORK's consumers' sizes read at that moment.

Nothing here runs per message: recording stays the instruments' own work, rendering runs
on a worker thread once an interval, and publishing is one publish awaited on a task of
its own, which a missing server or stream turns into a log line, never an error.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RawStreamMsg
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from ledgerbus.bus import subjects
from ledgerbus.bus.cancel import stop_task
from ledgerbus.bus.errors import BusError

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format, version 0.0.4: what every Prometheus server reads."""
PROCESS_LABEL = "ledgerbus_process"
"""The label naming the principal of the process a sample came from (``router``, ``agent-echo-1``)."""
INSTANCE_LABEL = "ledgerbus_instance"
"""The label telling apart processes of one principal (an agent's replicas, a standby router)."""
STALE_AFTER = 3
"""A snapshot older than this many of its publisher's intervals is dropped: its process is gone."""
STREAMS = (subjects.INGRESS_STREAM, subjects.AUDIT_STREAM, subjects.WORK_STREAM, subjects.DEADLETTER_STREAM,
           subjects.TRACES_STREAM, subjects.METRICS_STREAM)
"""The streams whose size :func:`scrape` reports."""
READ_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 5.0
RETRY_S = 1.0
"""How soon a snapshot that was not stored is tried again (at most its interval)."""
GATEWAY = "web"
"""The :data:`PROCESS_LABEL` of the gateway's own metrics, which it serves without the bus."""
GOODBYE = {subjects.HDR_METRICS_INTERVAL: "0"}
"""What the last snapshot of a stopping process says: no next one."""


class SnapshotPublisher:
    """Renders one process's metrics in the Prometheus text format and, once started,
    publishes them to METRICS every interval.

    :attr:`reader` goes to the process's meter provider. It is a pull reader with a
    registry of its own (not prometheus_client's global one): the SDK aggregates as the
    instruments record, and converts only when a snapshot is rendered. The registry also
    has prometheus_client's process collector (CPU seconds, resident memory, start time,
    open files; read from /proc, so on Linux only), which costs a few file reads a snapshot.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Every instrument is on the one "ledgerbus" meter: scope labels would say nothing.
        self.reader = PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)
        ProcessCollector(registry=self.registry)
        self.instance = secrets.token_hex(4)
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[Client, str, dict[str, str]] | None = None

    def render(self) -> bytes:
        """This process's metrics now, as a Prometheus text exposition (blocking: the SDK
        collects every instrument, observable gauges' callbacks included)."""
        return generate_latest(self.registry)

    def start(self, nc: Client, principal: str, interval_s: float) -> None:
        """Publish a snapshot now and every ``interval_s`` through ``nc`` as ``principal``
        (call on the connection's event loop)."""
        if self._task is not None:
            return
        subject = subjects.metrics(principal, self.instance)
        headers = {subjects.HDR_METRICS_INTERVAL: str(interval_s)}
        self._last = (nc, subject, headers)
        self._task = asyncio.create_task(self._run(nc, subject, headers, interval_s), name="metrics-snapshots")

    async def _run(self, nc: Client, subject: str, headers: dict[str, str], interval_s: float) -> None:
        # Acknowledged publishes, on this task only: a snapshot that did not reach METRICS
        # (the router has not made the stream yet, the server is away) is tried again
        # within a second rather than an interval later.
        js = nc.jetstream(timeout=min(interval_s, PUBLISH_TIMEOUT_S))
        while True:
            stored = False
            try:
                data = await asyncio.to_thread(self.render)
            except Exception as exc:  # noqa: BLE001 - a bad snapshot must not end the ones after it
                log.warning("metrics_render_failed", error=str(exc))
            else:
                try:
                    await js.publish(subject, data, headers=headers)
                    stored = True
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    self.dropped += 1
                    log.debug("metrics_publish_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(interval_s if stored else min(interval_s, RETRY_S))

    async def stop(self) -> None:
        """Stop publishing and replace this process's snapshot by an empty one whose interval
        is 0 (no next one), so that the gateway stops showing it at once rather than once it
        is stale (a stopping process)."""
        if self._task is None or self._last is None:
            return
        await stop_task(self._task)  # a publish's wait_for can swallow one cancel
        self._task = None
        nc, subject, headers = self._last
        if nc.is_connected:
            try:
                await nc.jetstream(timeout=PUBLISH_TIMEOUT_S).publish(subject, b"",
                                                                      headers={**headers, **GOODBYE})
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("metrics_goodbye_failed", error=str(exc))


def _unread(exc: BaseException, event: str, **about: str) -> None:
    """Log what could not be read from the bus; raise anything else (a bug)."""
    if not isinstance(exc, nats.errors.Error | TimeoutError):
        raise exc
    log.debug(event, error=str(exc) or type(exc).__name__, **about)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One process's latest metrics as it published them."""

    principal: str
    instance: str
    text: str
    age_s: float
    """How long ago METRICS stored it."""


def _snapshot(msg: RawStreamMsg, now: datetime) -> Snapshot | None:
    """The snapshot in ``msg``, or None for one to leave out: a goodbye (its process
    stopped), stale (its process died), or not one at all."""
    if msg.subject is None or msg.time is None:
        return None
    try:
        principal, instance = subjects.parse_metrics(msg.subject)
        interval_s = float((msg.headers or {})[subjects.HDR_METRICS_INTERVAL])
        text = (msg.data or b"").decode()
    except (subjects.SubjectError, KeyError, ValueError) as exc:
        log.debug("metrics_snapshot_unreadable", subject=msg.subject, error=str(exc))
        return None
    age_s = (now - msg.time).total_seconds()
    if not interval_s > 0 or age_s > STALE_AFTER * interval_s:
        return None
    return Snapshot(principal, instance, text, age_s)


async def snapshots(js: JetStreamContext) -> list[Snapshot]:
    """The latest snapshot of every live process, by principal and instance."""
    info = await js.stream_info(subjects.METRICS_STREAM, subjects_filter=subjects.METRICS_ALL)
    names = sorted(info.state.subjects or {})
    msgs = await asyncio.gather(*(js.get_last_msg(subjects.METRICS_STREAM, s, direct=True) for s in names),
                                return_exceptions=True)
    now = datetime.now(UTC)
    found = []
    for name, msg in zip(names, msgs, strict=True):
        if isinstance(msg, BaseException):
            # Gone since the stream's list was read (its age limit), or not answered in time.
            _unread(msg, "metrics_snapshot_unread", subject=name)
            continue
        if (snap := _snapshot(msg, now)) is not None:
            found.append(snap)
    return sorted(found, key=lambda s: (s.principal, s.instance))


def merge(snaps: Iterable[Snapshot], extra: Iterable[Metric] = ()) -> bytes:
    """One Prometheus text exposition of ``snaps`` and then ``extra``: each family once
    (its HELP and TYPE from the first snapshot that has it), every snapshot's samples
    labelled with its :data:`PROCESS_LABEL` and :data:`INSTANCE_LABEL`. A snapshot that
    does not parse is left out whole; a family whose type differs from the one already
    seen (processes of two ledgerbus versions) is left out of that snapshot."""
    families: dict[str, Metric] = {}
    for snap in snaps:
        try:
            parsed = list(text_string_to_metric_families(snap.text))
        except ValueError as exc:
            log.warning("metrics_snapshot_unparsable", principal=snap.principal, instance=snap.instance,
                        error=str(exc))
            continue
        labels = {PROCESS_LABEL: snap.principal, INSTANCE_LABEL: snap.instance}
        for family in parsed:
            into = families.setdefault(_exposed(family), Metric(family.name, family.documentation, family.type))
            if into.type != family.type:
                log.warning("metrics_type_conflict", family=family.name, principal=snap.principal,
                            types=[into.type, family.type])
                continue
            into.samples += [sample._replace(labels={**sample.labels, **labels}) for sample in family.samples]
    for family in extra:
        families.setdefault(_exposed(family), family)
    return render(families.values())


def _exposed(family: Metric) -> str:
    """The name a family has in the text format: a counter's with ``_total`` (the parser
    gives it without), so a gauge named like it is seen to clash."""
    return f"{family.name}_total" if family.type == "counter" else family.name


class _Families:
    """A prometheus_client collector of families made elsewhere."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(families: Iterable[Metric]) -> bytes:
    """``families`` in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def ages(snaps: Sequence[Snapshot]) -> Metric:
    """How old each process's snapshot was when read: the process is alive and publishing."""
    family = GaugeMetricFamily("ledgerbus_metrics_snapshot_age_seconds",
                               "Age of each live process's metrics snapshot on METRICS when the gateway read it",
                               labels=[PROCESS_LABEL, INSTANCE_LABEL], unit="seconds")
    for snap in snaps:
        family.add_metric([snap.principal, snap.instance], max(snap.age_s, 0.0))
    return family


async def sizes(js: JetStreamContext) -> list[Metric]:
    """The messages and bytes each ledgerbus stream holds, and how much of WORK each of its
    consumers has yet to deliver and to see acknowledged (a queue watcher's depth and
    unacked counts). What cannot be read (a stream not made yet, permissions from before
    this version) is left out."""
    messages = GaugeMetricFamily("ledgerbus_stream_messages", "Messages a stream holds now", labels=["stream"])
    size = GaugeMetricFamily("ledgerbus_stream_bytes", "Bytes a stream holds now", labels=["stream"], unit="bytes")
    pending = GaugeMetricFamily("ledgerbus_work_pending", "WORK messages a consumer has not delivered yet (queued)",
                                labels=["consumer"])
    unacked = GaugeMetricFamily("ledgerbus_work_ack_pending",
                                "WORK messages a consumer delivered to an agent and that are not acknowledged yet "
                                "(running)", labels=["consumer"])
    infos = await asyncio.gather(*(js.stream_info(stream) for stream in STREAMS), return_exceptions=True)
    for stream, info in zip(STREAMS, infos, strict=True):
        if isinstance(info, BaseException):
            _unread(info, "stream_size_unread", stream=stream)
            continue
        messages.add_metric([stream], info.state.messages)
        size.add_metric([stream], info.state.bytes)
    consumers: list[ConsumerInfo] = []
    try:
        # A page at a time (the server lists at most 256): one per skill, one per agent.
        while page := await js.consumers_info(subjects.WORK_STREAM, offset=len(consumers)):
            consumers += page
    except (nats.errors.Error, TimeoutError) as exc:
        log.debug("work_consumers_unread", error=str(exc) or type(exc).__name__)
    for consumer in sorted(consumers, key=lambda c: c.name):
        pending.add_metric([consumer.name], consumer.num_pending or 0)
        unacked.add_metric([consumer.name], consumer.num_ack_pending or 0)
    return [messages, size, pending, unacked]


async def scrape(nc: Client, own: SnapshotPublisher | None = None) -> bytes:
    """The whole system's metrics, read through ``nc`` (a CLI principal's connection):
    every live process's snapshot and the streams' sizes, and with ``own`` (the gateway's
    publisher: it has no principal to publish under) the scraped process's own metrics
    as :data:`GATEWAY`'s. Raises :class:`BusError` only when nothing at all could be read
    from the bus."""
    js = nc.jetstream(timeout=READ_TIMEOUT_S)
    read, system = await asyncio.gather(snapshots(js), sizes(js), return_exceptions=True)
    if isinstance(read, BaseException):
        _unread(read, "metrics_snapshots_unread")
        read = []
    if isinstance(system, BaseException):
        raise system
    if not read and not any(family.samples for family in system):
        raise BusError("no metrics could be read from the bus (is the NATS server up, and the router provisioned?)")
    if own is not None:
        read.append(Snapshot(GATEWAY, own.instance, (await asyncio.to_thread(own.render)).decode(), 0.0))
    return merge(read, [ages(read), *system])

