"""Telemetry pieces on their own: which exporters the OTEL_* settings make, log lines that
carry their span's ids, spans on the bus and back, and the waterfall's tree."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import structlog
from nats.aio.client import Client
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode
from rich.console import Console

from ledgerbus.agentctl.traces import render
from ledgerbus.bus.trace_tree import build_tree, read_trace
from ledgerbus.bus import logs, subjects, tracing
from ledgerbus.bus.spans import STATUS_ERROR, SpanBatch, SpanRecord, decode_batch, to_otlp_json


def exporters(telemetry: tracing.Telemetry) -> list[str]:
    assert telemetry.tracer_provider is not None
    processors = telemetry.tracer_provider._active_span_processor._span_processors
    return [type(p.span_exporter).__module__ + "." + type(p.span_exporter).__name__  # type: ignore[attr-defined]
            for p in processors]


def test_with_no_endpoint_only_the_bus_exporters_exist() -> None:
    telemetry = tracing.configure_telemetry("test", env={}, install=False)
    try:
        assert exporters(telemetry) == ["ledgerbus.bus.tracing.BusSpanExporter"]
        assert telemetry.meter_provider is not None and telemetry.snapshots is not None
        # The one metric reader is METRICS's, which only ever sends over the process's bus.
        assert telemetry.meter_provider._metric_readers == [telemetry.snapshots.reader]
        assert not tracing.otlp_configured("traces", {}) and not tracing.otlp_configured("metrics", {})
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(("env", "module"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "opentelemetry.exporter.otlp.proto.http"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, "opentelemetry.exporter.otlp.proto.http"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "opentelemetry.exporter.otlp.proto.grpc"),
])
def test_the_standard_variables_choose_the_otlp_exporter(env: dict[str, str], module: str) -> None:
    telemetry = tracing.configure_telemetry("test", env=env, install=False)
    try:
        found = exporters(telemetry)
        assert found[0] == "ledgerbus.bus.tracing.BusSpanExporter"
        assert len(found) == 2 and found[1].startswith(module)
        # A traces-only endpoint leaves metrics where they were: unexported.
        wanted = 2 if "OTEL_EXPORTER_OTLP_ENDPOINT" in env else 1
        assert telemetry.meter_provider is not None and len(telemetry.meter_provider._metric_readers) == wanted
    finally:
        # Nothing was recorded through these providers (not installed): nothing to send.
        telemetry.shutdown()


@pytest.mark.parametrize("env", [
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"},
])
def test_exporters_can_be_turned_off(env: dict[str, str]) -> None:
    assert not tracing.otlp_configured("traces", env) and not tracing.otlp_configured("metrics", env)
    telemetry = tracing.configure_telemetry("test", env=env, install=False)
    try:
        if env.get("OTEL_SDK_DISABLED"):
            assert telemetry.tracer_provider is None and telemetry.bus is None and telemetry.snapshots is None
        else:
            assert exporters(telemetry) == ["ledgerbus.bus.tracing.BusSpanExporter"]
    finally:
        telemetry.shutdown()


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    yield TracerProvider(resource=Resource.create({"service.name": "unit"}))


def test_every_log_line_inside_a_span_carries_its_ids(provider: TracerProvider) -> None:
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[*logs.shared_processors(), capture])
    try:
        log = structlog.get_logger("unit")
        tracer = provider.get_tracer("unit")
        log.info("outside")
        with tracer.start_as_current_span("outer") as outer:
            log.info("in_outer")
            # The agent's binding (by token): what it replaces comes back after it.
            with logs.bound_contextvars(task_id="t1", agent="a1"), \
                    tracer.start_as_current_span("inner") as inner:
                log.info("in_inner")
                with logs.bound_contextvars(task_id="t2"):
                    log.info("nested")
                log.info("unnested")
            log.info("back_in_outer")
    finally:
        structlog.reset_defaults()
    lines = {entry["event"]: entry for entry in capture.entries}
    assert "trace_id" not in lines["outside"] and "span_id" not in lines["outside"]
    for event, span in (("in_outer", outer), ("in_inner", inner), ("back_in_outer", outer)):
        ctx = span.get_span_context()
        assert lines[event]["trace_id"] == format(ctx.trace_id, "032x")
        assert lines[event]["span_id"] == format(ctx.span_id, "016x")
    assert lines["in_inner"]["task_id"] == "t1" and lines["in_inner"]["agent"] == "a1"
    assert lines["nested"]["task_id"] == "t2" and lines["nested"]["agent"] == "a1"
    assert lines["unnested"]["task_id"] == "t1"
    assert "task_id" not in lines["back_in_outer"]


def finished(provider: TracerProvider) -> tuple[tracing.BusSpanExporter, list[SpanRecord]]:
    """Record a small tree into a bus exporter that is not attached to a connection yet."""
    bus = tracing.BusSpanExporter(provider.resource)
    provider.add_span_processor(SimpleSpanProcessor(bus))
    tracer = provider.get_tracer("unit")
    with tracer.start_as_current_span("root", attributes={"n": 1, "f": 0.5, "ok": True, "tags": ("a", "b")}):
        with tracer.start_as_current_span("slow"):
            pass
        with tracer.start_as_current_span("broken") as broken:
            broken.set_status(Status(StatusCode.ERROR, "it broke"))
    spans = [s for _, data in bus._waiting for s in decode_batch(data).spans]
    return bus, spans


def test_spans_wait_for_a_connection_and_convert_to_otlp_json(provider: TracerProvider) -> None:
    bus, spans = finished(provider)
    assert [s.name for s in spans] == ["slow", "broken", "root"]
    root = spans[2]
    assert not root.parent_span_id and {s.parent_span_id for s in spans[:2]} == {root.span_id}
    assert root.attributes == {"n": 1, "f": 0.5, "ok": True, "tags": ["a", "b"]}
    assert spans[1].status == STATUS_ERROR and spans[1].status_message == "it broke"
    otlp = to_otlp_json([SpanBatch(resource=bus.resource, spans=spans)])
    [resource_spans] = otlp["resourceSpans"]
    assert {"key": "service.name", "value": {"stringValue": "unit"}} in resource_spans["resource"]["attributes"]
    [scope] = resource_spans["scopeSpans"]
    by_name = {s["name"]: s for s in scope["spans"]}
    assert by_name["root"]["traceId"] == root.trace_id and len(root.trace_id) == 32
    assert "parentSpanId" not in by_name["root"] and by_name["slow"]["parentSpanId"] == root.span_id
    assert by_name["root"]["kind"] == 1  # SPAN_KIND_INTERNAL
    assert {"key": "n", "value": {"intValue": "1"}} in by_name["root"]["attributes"]
    assert {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}}} \
        in by_name["root"]["attributes"]
    assert by_name["broken"]["status"] == {"code": 2, "message": "it broke"}
    assert int(by_name["root"]["endTimeUnixNano"]) >= int(by_name["root"]["startTimeUnixNano"])


def span(span_id: str, parent: str, start: int, end: int, name: str = "", error: bool = False) -> SpanRecord:
    return SpanRecord(trace_id="a" * 32, span_id=span_id.ljust(16, "0"), parent_span_id=parent.ljust(16, "0")
                      if parent else "", name=name or span_id, kind=1, start_ns=start, end_ns=end,
                      status=STATUS_ERROR if error else 0)


def test_the_tree_follows_parents_and_the_critical_path_follows_the_last_subtree() -> None:
    batches = [
        SpanBatch(resource={"service.name": "cli"}, spans=[span("root", "", 0, 10)]),
        # "early" itself ends first, but its child ends last: the path goes through it.
        SpanBatch(resource={"service.name": "router"}, spans=[
            span("early", "root", 1, 3), span("late", "root", 2, 40), span("deep", "early", 3, 90),
            span("check1", "early", 1, 2, "router.check size"), span("check2", "early", 2, 3, "router.check rate"),
            span("lost", "nothere", 5, 6, "orphan", error=True),
        ]),
        SpanBatch(resource={"service.name": "router"}, spans=[span("late", "root", 2, 40)]),  # published twice
    ]
    tree = build_tree("a" * 32, batches)
    assert tree.count == 7 and tree.services == ["cli", "router"]
    assert [n.span.name for n in tree.critical_path()] == ["root", "early", "deep"]
    orphan = next(n for n in tree.walk() if n.span.name == "orphan")
    assert orphan.orphan and orphan in tree.roots
    console = Console(width=160, record=True)
    console.print(render(tree, "t1"))
    text = console.export_text()
    assert "router.check ×2 passed" in text and "router.check size" not in text
    assert "parent not in TRACES" in text and "critical path: root → early → deep" in text
    console = Console(width=160, record=True)
    console.print(render(tree, "t1", every_check=True))
    assert "router.check size" in console.export_text()


async def test_spans_published_on_the_bus_read_back_by_trace(admin: Client, running_router: object,
                                                             provider: TracerProvider) -> None:
    # The router fixture provisions TRACES; admin publishes as "admin".
    bus, spans = finished(provider)
    bus.attach(admin, "admin")
    await bus.flush()
    js = admin.jetstream()
    info = await js.stream_info(subjects.TRACES_STREAM)
    assert info.state.messages >= 1
    batches = await asyncio.wait_for(read_trace(js, spans[0].trace_id), 10)
    assert sorted(s.span_id for b in batches for s in b.spans) == sorted(s.span_id for s in spans)
    assert batches[0].service == "unit"


def test_each_check_is_a_span_and_failed_keeps_only_the_rejecting_one(
    provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ledgerbus.router import checks
    from ledgerbus.router.checks import Inbound, Rejection, run_checks
    from ledgerbus.router.state import RouterState

    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(checks, "tracer", provider.get_tracer("ledgerbus.router"))

    def size(msg: Inbound, state: RouterState) -> Rejection | None:
        return None

    def lifecycle(msg: Inbound, state: RouterState) -> Rejection | None:
        return Rejection("duplicate_task", "task t1 was already submitted")

    def never(msg: Inbound, state: RouterState) -> Rejection | None:
        raise AssertionError("the first rejection wins")

    # Named by module and function: these are test_telemetry.size and test_telemetry.lifecycle.
    first, second = (f"router.check {checks.check_name(c)}" for c in (size, lifecycle))
    for passing, wanted in ((True, [first, second]), (False, [second])):
        memory.clear()
        msg = Inbound(subject="in.cli.alice.task_submitted", data=b"{}", headers={}, ingress_seq=1, delivery=1)
        with provider.get_tracer("unit").start_as_current_span("router.process"):
            _, rejection = run_checks([size, lifecycle, never], msg, RouterState(), trace_passing=passing)
        assert rejection is not None and rejection.code == "duplicate_task"
        spans = [s for s in memory.get_finished_spans() if s.name.startswith("router.check")]
        assert [s.name for s in spans] == wanted
        assert spans[-1].status.status_code == StatusCode.ERROR
        assert spans[-1].status.description == "duplicate_task: task t1 was already submitted"
        assert spans[-1].attributes is not None and spans[-1].attributes["ledgerbus.code"] == "duplicate_task"
        process = next(s for s in memory.get_finished_spans() if s.name == "router.process")
        assert all(s.parent is not None and s.parent.span_id == process.context.span_id for s in spans)
    # Unsampled (no recording span around): the checks make no span at all.
    memory.clear()
    run_checks([size, lifecycle], Inbound(subject="x", data=b"", headers={}, ingress_seq=1, delivery=1), RouterState())
    assert memory.get_finished_spans() == ()


def test_the_router_hands_run_checks_its_span_without_making_it_current(
    provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router passes each message's span in rather than entering it (2 µs a message):
    the checks' spans are still its children, and a check that raises is logged with the
    message's trace, sampled or not."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from ledgerbus.router import checks
    from ledgerbus.router.checks import Inbound, run_checks
    from ledgerbus.router.state import RouterState

    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(checks, "tracer", provider.get_tracer("ledgerbus.router"))

    def broken(msg: Inbound, state: RouterState) -> None:
        raise KeyError("bug")

    msg = Inbound(subject="in.cli.alice.task_submitted", data=b"{}", headers={}, ingress_seq=1, delivery=1)
    process = provider.get_tracer("unit").start_span("router.process")
    _, rejection = run_checks([broken], msg, RouterState(), span=process)
    process.end()
    assert rejection is not None and rejection.code == "internal_error"
    (check,) = [s for s in memory.get_finished_spans() if s.name.startswith("router.check")]
    assert check.parent is not None and check.parent.span_id == process.get_span_context().span_id

    unsampled = NonRecordingSpan(SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False,
                                             trace_flags=TraceFlags(0)))
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[*logs.shared_processors(), capture])
    memory.clear()
    try:
        _, rejection = run_checks([broken], msg, RouterState(), span=unsampled)
    finally:
        structlog.reset_defaults()
    assert rejection is not None and memory.get_finished_spans() == ()
    (line,) = [e for e in capture.entries if e["event"] == "check_raised"]
    assert line["trace_id"] == format(0xABC, "032x")


def test_headers_of_a_span_are_what_the_propagator_writes(provider: TracerProvider) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    sampled = provider.get_tracer("unit").start_span("s")
    unsampled = NonRecordingSpan(SpanContext(trace_id=1, span_id=2, is_remote=False, trace_flags=TraceFlags(0)))
    with_state = NonRecordingSpan(SpanContext(trace_id=3, span_id=4, is_remote=True, trace_flags=TraceFlags(1),
                                              trace_state=TraceState([("vendor", "v1")])))
    for span in (sampled, unsampled, with_state, trace.INVALID_SPAN):
        assert tracing.headers_of(span) == tracing.inject(context=trace.set_span_in_context(span))
        with trace.use_span(span):  # the current span's, as a report's headers are made
            assert tracing.inject({"Nats-Msg-Id": "m"}) == {
                "Nats-Msg-Id": "m", **tracing.inject(context=trace.set_span_in_context(span))}
    assert tracing.headers_of(with_state)["tracestate"] == "vendor=v1"
    assert tracing.headers_of(unsampled) == {subjects.HDR_TRACEPARENT: f"00-{1:032x}-{2:016x}-00"}


def test_an_unsampled_senders_hop_is_made_as_the_sdk_makes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """tracing.start_span makes the span of a message whose trace its sender did not sample
    itself (most messages: 2 µs against the SDK's 11); it must be the span the SDK would
    make, and everything else must still go through the SDK."""
    from opentelemetry import trace

    ours = tracing.sampler({})  # configure_telemetry's, as installed
    assert ours is not None
    provider = TracerProvider(sampler=ours)
    tracer = provider.get_tracer("unit")
    monkeypatch.setattr(tracing, "_unsampled_ids", provider.id_generator)
    monkeypatch.setattr(tracing, "_roots", ours.roots)
    trace_id, parent_id = 0xABC, 0xDEF
    unsampled = {subjects.HDR_TRACEPARENT: f"00-{trace_id:032x}-{parent_id:016x}-00", "Nats-Msg-Id": "m1"}
    cases: list[dict[str, str] | None] = [
        unsampled,
        {subjects.HDR_TRACEPARENT: f"00-{trace_id:032x}-{parent_id:016x}-02"},  # a random trace id (W3C level 2)
        {**unsampled, "tracestate": "vendor=v1"},
        {subjects.HDR_TRACEPARENT: f"00-{trace_id:032x}-{parent_id:016x}-01"},  # sampled: recorded
        {subjects.HDR_TRACEPARENT: f"cc-{trace_id:032x}-{parent_id:016x}-00-future"},  # a later version
        {subjects.HDR_TRACEPARENT: f"00-{0:032x}-{parent_id:016x}-00"},  # invalid: a new trace
        {subjects.HDR_TRACEPARENT: "garbage"},
        {},
        None,
    ]
    for headers in cases:
        fast = tracing.start_span(tracer, "hop", headers)
        slow = tracer.start_span("hop", context=tracing.extract(headers))
        got, want = fast.get_span_context(), slow.get_span_context()
        assert fast.is_recording() == slow.is_recording(), headers
        assert (got.trace_flags, got.trace_state, got.is_remote) == (want.trace_flags, want.trace_state,
                                                                     want.is_remote), headers
        assert (got.trace_id == trace_id) == (want.trace_id == trace_id), headers
        assert got.is_valid and got.span_id != parent_id, headers
        fast.end()
        slow.end()

    # The unsampled case does not reach the SDK; without the installed sampler, it does.
    def sdk(*args: object, **kwargs: object) -> trace.Span:
        raise AssertionError("went through the SDK")

    monkeypatch.setattr(tracer, "start_span", sdk)
    assert tracing.start_span(tracer, "hop", unsampled).get_span_context().trace_id == trace_id
    monkeypatch.setattr(tracing, "_unsampled_ids", None)
    with pytest.raises(AssertionError, match="SDK"):
        tracing.start_span(tracer, "hop", unsampled)


def test_a_new_trace_the_rate_drops_is_made_as_the_sdk_makes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message without a ``traceparent`` starts a trace: while the rate is spent,
    tracing.start_span makes its unsampled span itself, as the SDK would (a new trace id),
    and a new trace the rate allows goes through the SDK and is sampled once."""
    from opentelemetry import trace

    ours = tracing.sampler({"LEDGERBUS_TRACE_RATE": "1"})  # a bucket of one token
    assert ours is not None
    provider = TracerProvider(sampler=ours)
    tracer = provider.get_tracer("unit")
    monkeypatch.setattr(tracing, "_unsampled_ids", provider.id_generator)
    monkeypatch.setattr(tracing, "_roots", ours.roots)
    assert all(ours.roots.would_sample() for _ in range(5)), "asking does not take the token"
    first = tracing.start_span(tracer, "hop", {"Nats-Msg-Id": "m1"})
    assert first.is_recording(), "the rate allowed it: sampled, through the SDK"
    first.end()

    real = tracer.start_span

    def sdk(*args: object, **kwargs: object) -> trace.Span:
        raise AssertionError("went through the SDK")

    monkeypatch.setattr(tracer, "start_span", sdk)
    fast = [tracing.start_span(tracer, "hop", headers) for headers in ({"Nats-Msg-Id": "m2"}, {}, None)]
    monkeypatch.setattr(tracer, "start_span", real)
    slow = tracer.start_span("hop", context=tracing.extract(None))  # the SDK's own, also dropped
    want = slow.get_span_context()
    assert not slow.is_recording()
    for span in fast:
        got = span.get_span_context()
        assert not span.is_recording() and got.is_valid
        assert (got.trace_flags, got.trace_state, got.is_remote) == (want.trace_flags, want.trace_state,
                                                                     want.is_remote)
    assert len({s.get_span_context().trace_id for s in [*fast, slow, first]}) == 5, "each a new trace"
    # A trace state, or no installed sampler, goes through the SDK.
    monkeypatch.setattr(tracer, "start_span", sdk)
    with pytest.raises(AssertionError, match="SDK"):
        tracing.start_span(tracer, "hop", {"tracestate": "vendor=v1"})
    monkeypatch.setattr(tracing, "_roots", None)
    with pytest.raises(AssertionError, match="SDK"):
        tracing.start_span(tracer, "hop", None)


def test_trace_checks_is_all_or_failed() -> None:
    from ledgerbus.bus.errors import ConfigError
    from ledgerbus.bus.settings import Settings

    assert Settings.from_env({}).trace_checks == "failed"
    assert Settings.from_env({"LEDGERBUS_TRACE_CHECKS": "all"}).trace_checks == "all"
    with pytest.raises(ConfigError, match="LEDGERBUS_TRACE_CHECKS='some': one of all, failed"):
        Settings.from_env({"LEDGERBUS_TRACE_CHECKS": "some"})


def test_new_traces_are_rate_limited_and_arriving_ones_follow_their_sender() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from ledgerbus.bus.errors import ConfigError
    from ledgerbus.bus.tracing import RateLimited, sampler

    provider = TracerProvider(sampler=sampler({"LEDGERBUS_TRACE_RATE": "5"}))
    tracer = provider.get_tracer("t")
    burst = [tracer.start_span("root") for _ in range(50)]
    assert sum(s.is_recording() for s in burst) == 5, "a burst gets one second's worth of new traces"
    # A trace that arrives is recorded as its sender decided, whatever the rate.
    for flags, recording in ((TraceFlags.SAMPLED, True), (TraceFlags.DEFAULT, False)):
        parent = NonRecordingSpan(SpanContext(trace_id=7, span_id=9, is_remote=True, trace_flags=TraceFlags(flags)))
        child = tracer.start_span("child", context=trace.set_span_in_context(parent))
        assert child.is_recording() is recording
    # Tokens come back with time.
    limited = RateLimited(1000)
    assert sum(limited.should_sample(None, 1, "x").decision.is_sampled() for _ in range(2000)) in range(1000, 1100)
    assert sampler({"LEDGERBUS_TRACE_RATE": "inf"}).get_description().startswith("ParentBased")  # type: ignore[union-attr]
    assert RateLimited(float("inf")).should_sample(None, 1, "x").decision.is_sampled()
    assert not RateLimited(0).should_sample(None, 1, "x").decision.is_sampled()
    assert sampler({"OTEL_TRACES_SAMPLER": "always_on"}) is None, "the standard variable wins"
    with pytest.raises(ConfigError, match="LEDGERBUS_TRACE_RATE='lots'"):
        sampler({"LEDGERBUS_TRACE_RATE": "lots"})
    with pytest.raises(ConfigError, match="LEDGERBUS_TRACE_RATE='-1'"):
        sampler({"LEDGERBUS_TRACE_RATE": "-1"})
