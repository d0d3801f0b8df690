"""OpenTelemetry in every process: W3C trace context in NATS headers, the providers each
entry point installs once, and the exporter that puts finished spans on the bus.

The ``traceparent`` header rides on every message, INGRESS to WORK and back, and on every
AUDIT record, so one task is one trace across the CLI, the router, the agents and the
projector. Spans always go to the TRACES stream (``agentctl trace`` reads them there, with
no other service running), and a long-running process's metrics to METRICS, a snapshot
every ``LEDGERBUS_METRICS_INTERVAL_S`` (the gateway's ``/metrics`` serves them,
:mod:`bus.exposition`). Both also go over OTLP, but only when the standard
``OTEL_EXPORTER_OTLP_*`` variables name an endpoint: with none set, nothing is sent
anywhere else. ``OTEL_SDK_DISABLED=true`` turns all of it off.

Sampling: a trace that arrives (a ``traceparent`` header) is recorded as its sender decided;
a process starting a trace of its own (``agentctl submit``, or the router for a message that
came without one) records it while it starts no more than ``LEDGERBUS_TRACE_RATE`` traces a
second (default 50, ``inf`` for every one): every task of a quiet system is traced, and
under load tracing costs a bounded share. ``OTEL_TRACES_SAMPLER`` (and its ``_ARG``), when
set, replaces this rule, as the SDK documents.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ledgerbus.bus import subjects
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.exposition import SnapshotPublisher
from ledgerbus.bus.redaction import scrub
from ledgerbus.bus.spans import SpanBatch, SpanEvent, SpanRecord

log = structlog.get_logger(__name__)

_propagator = TraceContextTextMapPropagator()

_unsampled_ids: IdGenerator | None = None
"""The installed provider's id generator, once :func:`configure_telemetry` installed its
own parent-based sampler (one that drops whatever an unsampled parent sends): then
:func:`start_span` makes an unsampled sender's span itself."""
_roots: RateLimited | None = None
"""That sampler's root sampler: :func:`start_span` asks it whether a new trace would be
sampled, and makes the span of one that would not itself."""
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

_encoder = msgspec.json.Encoder()

MAX_SPANS_PER_MESSAGE = 128
"""Spans per TRACES message: well under NATS's payload limit with ordinary attributes."""
BUS_QUEUE = 32_768
"""Finished spans waiting for the TRACES exporter; beyond it the SDK drops them (and says so)."""
_MAX_UNATTACHED = 2048
"""Messages kept while a process has no connection yet; later ones are dropped."""


def sdk_disabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``OTEL_SDK_DISABLED=true`` turns tracing and metrics off altogether."""
    env = os.environ if env is None else env
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def otlp_configured(signal: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard variables ask for OTLP export of ``signal`` (``traces`` or
    ``metrics``): an endpoint is set and ``OTEL_<SIGNAL>_EXPORTER`` is not ``none``."""
    env = os.environ if env is None else env
    if sdk_disabled(env):
        return False
    exporters = {e.strip() for e in env.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").split(",")}
    if "otlp" not in exporters:
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"))


def _protocol(signal: str, env: Mapping[str, str]) -> str:
    return env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")


def _grpc_missing(exc: ImportError) -> ConfigError:
    return ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: pip install 'ledgerbus[otlp-grpc]' "
                       f"(or use http/protobuf, the default) ({exc})")


def _otlp_span_exporter(env: Mapping[str, str]) -> SpanExporter:
    if _protocol("traces", env) == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise _grpc_missing(exc) from exc
        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter
    return HTTPSpanExporter()


def _otlp_metric_reader(env: Mapping[str, str]) -> MetricReader:
    if _protocol("metrics", env) == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        except ImportError as exc:
            raise _grpc_missing(exc) from exc
        return PeriodicExportingMetricReader(OTLPMetricExporter())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HTTPMetricExporter
    return PeriodicExportingMetricReader(HTTPMetricExporter())


DEFAULT_TRACE_RATE = 50.0
"""New traces a process starts per second at most, unless ``LEDGERBUS_TRACE_RATE`` says."""


class RateLimited(Sampler):
    """Samples new traces while fewer than ``per_second`` were sampled in the last second
    (a token bucket holding one second's worth), drops the others: Jaeger's
    "ratelimiting" sampler. Used for root spans only (:func:`sampler`)."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self._tokens = max(per_second, 1.0) if per_second > 0 else 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,  # noqa: PLR0913
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        if self.per_second == float("inf"):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        with self._lock:
            sampled = self._refill()
            if sampled:
                self._tokens -= 1.0
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes) if sampled else SamplingResult(Decision.DROP)

    def would_sample(self) -> bool:
        """Whether a new trace started now would be sampled, without taking its token (the
        sampling itself takes it)."""
        if self.per_second == float("inf"):
            return True
        with self._lock:
            return self._refill()

    def _refill(self) -> bool:
        now = time.monotonic()
        self._tokens = min(max(self.per_second, 1.0), self._tokens + (now - self._last) * self.per_second)
        self._last = now
        return self._tokens >= 1.0

    def get_description(self) -> str:
        return f"RateLimited{{{self.per_second:g}/s}}"


class RateLimitedRoots(ParentBased):
    """Parent-based, with :class:`RateLimited` roots (kept as ``roots``)."""

    def __init__(self, roots: RateLimited) -> None:
        super().__init__(root=roots)
        self.roots = roots


def sampler(env: Mapping[str, str]) -> RateLimitedRoots | None:
    """The sampler a process's provider gets: ``None`` (the SDK reads ``OTEL_TRACES_SAMPLER``)
    when that variable is set, else a parent-based one whose roots are :class:`RateLimited`
    at ``LEDGERBUS_TRACE_RATE``."""
    if env.get("OTEL_TRACES_SAMPLER"):
        return None
    raw = env.get("LEDGERBUS_TRACE_RATE", "").strip()
    try:
        rate = float(raw) if raw else DEFAULT_TRACE_RATE
    except ValueError as exc:
        raise ConfigError(f"LEDGERBUS_TRACE_RATE={raw!r}: a number of traces a second, or inf") from exc
    if not rate >= 0:
        raise ConfigError(f"LEDGERBUS_TRACE_RATE={raw!r}: a number of traces a second, or inf")
    return RateLimitedRoots(RateLimited(rate))


def span_record(span: ReadableSpan) -> SpanRecord:
    """The bus form of a finished SDK span."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return SpanRecord(
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_span_id=format(parent.span_id, "016x") if parent is not None else "",
        name=span.name,
        kind=span.kind.value + 1,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        status=span.status.status_code.value,
        status_message=span.status.description or "",
        attributes=dict(span.attributes or {}),
        events=[SpanEvent(name=e.name, time_ns=e.timestamp, attributes=dict(e.attributes or {}))
                for e in span.events],
        scope=span.instrumentation_scope.name if span.instrumentation_scope else "",
    )


class BusSpanExporter(SpanExporter):
    """Publishes finished spans to ``traces.<trace id>.<principal>``, one message per
    trace and batch, on the process's own NATS connection.

    :meth:`export` runs in the batch processor's thread: it only encodes and hands the
    messages to the connection's event loop, never blocking on the network. Until a
    connection is attached, messages wait (a bounded number). Publishing is best
    effort: traces are for looking at, the audit log is the record.
    """

    def __init__(self, resource: Resource) -> None:
        self.resource = {k: v for k, v in resource.attributes.items()}
        self.principal = ""
        self._nc: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[tuple[str, bytes]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self.dropped = 0

    def attach(self, nc: Client, principal: str) -> None:
        """Publish from now on through ``nc`` as ``principal`` (call on its event loop)."""
        with self._lock:
            self._nc, self._loop, self.principal = nc, asyncio.get_running_loop(), principal
            waiting, self._waiting = self._waiting, []
        if waiting:
            self._send(waiting)

    def detach(self) -> None:
        """Stop publishing (the connection is closing); later spans wait again."""
        with self._lock:
            self._nc = self._loop = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        by_trace: dict[str, list[SpanRecord]] = defaultdict(list)
        for span in spans:
            record = span_record(span)
            by_trace[record.trace_id].append(record)
        messages = [
            (trace_id, _encoder.encode(SpanBatch(resource=self.resource, spans=records[i:i + MAX_SPANS_PER_MESSAGE])))
            for trace_id, records in by_trace.items()
            for i in range(0, len(records), MAX_SPANS_PER_MESSAGE)
        ]
        with self._lock:
            loop = self._loop
            if loop is None:
                room = max(0, _MAX_UNATTACHED - len(self._waiting))
                self._waiting += messages[:room]
                self.dropped += len(messages) - min(room, len(messages))
                return SpanExportResult.SUCCESS
        # One hand-over per batch, not per message: the serving loop wakes once, and the
        # connection writes the whole batch in one go.
        try:
            loop.call_soon_threadsafe(self._send, messages)
        except RuntimeError:  # the loop is closed: the process is ending
            self.dropped += len(messages)
        return SpanExportResult.SUCCESS

    def _send(self, messages: list[tuple[str, bytes]]) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            with self._lock:
                self._waiting += messages
            return
        task = asyncio.ensure_future(self._publish(nc, messages))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, nc: Client, messages: list[tuple[str, bytes]]) -> None:
        for n, (trace_id, data) in enumerate(messages):
            try:
                await nc.publish(subjects.traces(trace_id, self.principal), data)
            except (nats.errors.Error, OSError) as exc:
                self.dropped += len(messages) - n
                log.debug("trace_publish_failed", error=str(exc))
                return

    async def flush(self) -> None:
        """Wait until every span handed over so far is published and the server has it."""
        await asyncio.sleep(0)  # let call_soon_threadsafe callbacks run
        if self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)
        if self._nc is not None and self._nc.is_connected:
            try:
                await self._nc.flush(timeout=5)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("trace_flush_failed", error=str(exc))

    def shutdown(self) -> None:
        self.detach()


class Telemetry:
    """The tracer and meter providers one process installed, its TRACES exporter and its
    METRICS publisher."""

    def __init__(self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None,
                 bus: BusSpanExporter | None, snapshots: SnapshotPublisher | None = None) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.bus = bus
        self.snapshots = snapshots

    def attach(self, nc: Client, principal: str, metrics_interval_s: float | None = None) -> None:
        """Send spans to TRACES through ``nc`` from now on and, given ``metrics_interval_s``
        (a process that serves, not a command that sends one thing), a metrics snapshot to
        METRICS every that many seconds (call on the connection's event loop)."""
        if self.bus is not None:
            self.bus.attach(nc, principal)
        if self.snapshots is not None and metrics_interval_s is not None:
            self.snapshots.start(nc, principal, metrics_interval_s)

    async def flush(self) -> None:
        """Push every finished span out to TRACES now, and stop the metrics snapshots
        (before a connection closes)."""
        if self.snapshots is not None:
            await self.snapshots.stop()
        if self.tracer_provider is None or self.bus is None:
            return
        await asyncio.to_thread(self.tracer_provider.force_flush, 5_000)
        await self.bus.flush()
        self.bus.detach()

    def shutdown(self) -> None:
        """Flush and stop the OTLP exporters (at process exit)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def configure_telemetry(service_name: str, env: Mapping[str, str] | None = None, install: bool = True) -> Telemetry:
    """Install this process's tracer and meter providers (call once, in the entry point;
    ``install=False`` only builds them).

    Spans are batched to TRACES (once :meth:`Telemetry.attach` names a connection) and,
    if configured, to OTLP; metrics are read for METRICS (when ``attach`` is given an
    interval) and, if configured, pushed to OTLP.
    """
    env = os.environ if env is None else env
    if sdk_disabled(env):
        return Telemetry(None, None, None)
    resource = Resource.create({SERVICE_NAME: service_name})
    ours = sampler(env)
    tracer_provider = TracerProvider(resource=resource, sampler=ours)
    bus = BusSpanExporter(tracer_provider.resource)
    # A larger queue than the SDK's 2,048: a busy router finishes a span per check.
    tracer_provider.add_span_processor(BatchSpanProcessor(bus, schedule_delay_millis=250, max_queue_size=BUS_QUEUE))
    if otlp_configured("traces", env):
        tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter(env)))
    snapshots = SnapshotPublisher()
    readers = [snapshots.reader, *([_otlp_metric_reader(env)] if otlp_configured("metrics", env) else [])]
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if install:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        skip_sdk_when_unsampled(tracer_provider, ours)
    return Telemetry(tracer_provider, meter_provider, bus, snapshots)


def skip_sdk_when_unsampled(provider: TracerProvider | None, ours: RateLimitedRoots | None) -> None:
    """Let :func:`start_span` make unsampled spans itself, for ``provider`` whose sampler is
    ``ours`` (:func:`configure_telemetry` does this for the provider it installs); ``None``
    sends every span through the SDK again."""
    global _unsampled_ids, _roots
    if provider is None or ours is None:
        _unsampled_ids, _roots = None, None
    else:
        _unsampled_ids, _roots = provider.id_generator, ours.roots


def inject(headers: dict[str, str] | None = None, context: otel_context.Context | None = None) -> dict[str, str]:
    """Return ``headers`` plus the ``traceparent`` of ``context`` (default: the current span)."""
    carrier = dict(headers or {})
    if context is None:
        carrier.update(headers_of(trace.get_current_span()))
    else:
        _propagator.inject(carrier, context=context)
    return carrier


def start_span(tracer: trace.Tracer, name: str, headers: Mapping[str, str] | None,
               kind: trace.SpanKind = trace.SpanKind.CONSUMER) -> trace.Span:
    """``tracer.start_span(name, context=extract(headers), kind=kind)``, the span of one
    hop for the message these headers came with (not made current).

    Most messages belong to traces their sender did not sample (at most
    ``LEDGERBUS_TRACE_RATE`` new ones a second are). For those, with this process's own
    parent-based sampler installed, the span is made here as the SDK makes it (a
    non-recording span in the sender's trace, a new span id, unsampled, the sender's
    random-trace-id flag, no trace state),
    without the context, the sampler and the span machinery: 3 µs against 11, on each
    hop of nearly every task. So is a new trace's first span while the rate is spent (a
    new trace id too): most submissions that come without a ``traceparent``. Anything
    else (a sampled parent, a new trace that will be sampled, a trace state, another
    ``traceparent`` version, a sampler set by ``OTEL_TRACES_SAMPLER``) goes through the SDK.
    """
    ids = _unsampled_ids
    if ids is not None:
        parent = headers.get(subjects.HDR_TRACEPARENT) if headers else None
        if parent is None:
            if _roots is not None and not (headers and "tracestate" in headers) and not _roots.would_sample():
                flags = trace.TraceFlags.RANDOM_TRACE_ID if ids.is_trace_id_random() else trace.TraceFlags.DEFAULT
                return trace.NonRecordingSpan(trace.SpanContext(ids.generate_trace_id(), ids.generate_span_id(),
                                                                is_remote=False, trace_flags=trace.TraceFlags(flags)))
        elif headers is not None and "tracestate" not in headers and (m := _TRACEPARENT.fullmatch(parent)) \
                and not (flags := int(m[3], 16)) & trace.TraceFlags.SAMPLED and int(m[1], 16) and int(m[2], 16):
            # Unsampled, as the parent; random trace id (W3C level 2), as the parent says.
            return trace.NonRecordingSpan(trace.SpanContext(int(m[1], 16), ids.generate_span_id(), is_remote=False,
                                                            trace_flags=trace.TraceFlags(
                                                                flags & trace.TraceFlags.RANDOM_TRACE_ID)))
    return tracer.start_span(name, context=extract(headers), kind=kind)


def headers_of(span: trace.Span) -> dict[str, str]:
    """The headers that make ``span`` the parent of what a message causes: what
    :func:`inject` writes for a context holding ``span``, without making that context (the
    router does this for every message: 1 µs here, 3 through the propagator)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    if ctx.trace_state:
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier
    return {subjects.HDR_TRACEPARENT: f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by a message's headers (empty context if none)."""
    return _propagator.extract(dict(headers or {}))


def context_of(parent: str) -> otel_context.Context:
    """The context a ``traceparent`` string names (empty if none)."""
    return extract({subjects.HDR_TRACEPARENT: parent} if parent else None)


def trace_id_of_span(span: trace.Span) -> str:
    """A span's trace id as 32 hex digits, or '' for a non-recording span."""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def messaging(destination: str, operation: str, message_id: str = "", *, from_client: bool = False) -> dict[str, Any]:
    """Span attributes after the OpenTelemetry messaging conventions, for NATS;
    ``operation`` is ``publish``, ``receive`` or ``process``.

    ``from_client``: a client chose the subject's last token and the message id (its
    ``Nats-Msg-Id`` header), as on the router's ingress span. Spans leave for TRACES and
    any OTLP endpoint, so both then go through the redaction message bodies get
    (:mod:`bus.redaction`) before they become attributes. Subjects and ids the router
    builds from a checked message need none (and skip its cost: about 1 us each).
    """
    op_type = {"publish": "send", "receive": "receive", "process": "process"}[operation]
    attrs: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": scrub(destination) if from_client else destination,
        "messaging.operation.type": op_type,
        "messaging.operation.name": operation,
    }
    if message_id:
        attrs["messaging.message.id"] = scrub(message_id) if from_client else message_id
    return attrs
