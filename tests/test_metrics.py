"""Metrics from every process to one Prometheus target: each process's snapshot on METRICS,
merged by the gateway's ``/metrics``, read back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx2 as httpx
from nats.aio.client import Client
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ledgerbus.bus import exposition, subjects, tokens
from ledgerbus.bus.exposition import INSTANCE_LABEL, PROCESS_LABEL, Snapshot, SnapshotPublisher
from ledgerbus.bus.metrics import Tally
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import Procs, wait_for_record, wait_until
from tests.test_e2e import joined
from tests.test_web import _free_port

Connect = Callable[[str], Awaitable[Client]]


def recorded(service: str, record: Callable[[Meter], None]) -> str:
    """The snapshot a process of ``service`` publishes after ``record`` on its meter."""
    publisher = SnapshotPublisher()
    provider = MeterProvider(resource=Resource.create({"service.name": service}), metric_readers=[publisher.reader])
    try:
        record(provider.get_meter("ledgerbus"))
        return publisher.render().decode()
    finally:
        provider.shutdown()


ROUTED = [(2, {"kind": "task_submitted", "verdict": "accepted", "code": "ok"}),
          (1, {"kind": "task_submitted", "verdict": "rejected", "code": "duplicate_task"}),
          # The same attributes in another order are the same point.
          (1, {"code": "ok", "verdict": "accepted", "kind": "task_submitted"})]


def routed(meter: Meter) -> None:
    messages = Tally("ledgerbus.router.messages", unit="{message}", description="Messages audited", on=meter)
    for n, attributes in ROUTED:
        messages.add(n, attributes)

    def tasks(_: CallbackOptions) -> list[Observation]:
        return [Observation(2, {"state": "running"})]

    meter.create_observable_gauge("ledgerbus.tasks", callbacks=[tasks], unit="{task}", description="Tasks by state")


def ran(*durations: float) -> Callable[[Meter], None]:
    def record(meter: Meter) -> None:
        histogram = meter.create_histogram("ledgerbus.skill.duration", unit="s", description="Skill runs",
                                           explicit_bucket_boundaries_advisory=(0.01, 0.1, 1.0))
        for seconds in durations:
            histogram.record(seconds, {"ledgerbus.skill": "echo", "ledgerbus.outcome": "completed"})
    return record


def samples(text: str, name: str) -> list[Sample]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def processes(text: str) -> set[str]:
    """The processes a scrape shows alive: one snapshot age each, whatever they recorded."""
    return {s.labels[PROCESS_LABEL] for s in samples(text, "ledgerbus_metrics_snapshot_age_seconds")}


def assert_valid(text: str) -> None:
    """Parses, and declares each family once with its samples together, as Prometheus wants."""
    families = list(text_string_to_metric_families(text))
    assert len({f.name for f in families}) == len(families)
    declared = Counter(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
    assert declared and set(declared.values()) == {1}, declared
    for family in families:
        if family.type != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], list[Sample]] = {}
        for s in family.samples:
            series.setdefault(tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")), []).append(s)
        for points in series.values():
            buckets = [p for p in points if p.name.endswith("_bucket")]
            counts = [p.value for p in buckets]
            assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
            assert [p.value for p in points if p.name.endswith("_count")] == [counts[-1]]


def test_a_tally_is_exported_as_the_sdk_counter_it_replaces() -> None:
    def counter(meter: Meter) -> None:
        messages = meter.create_counter("ledgerbus.router.messages", unit="{message}", description="Messages audited")
        for n, attributes in ROUTED:
            messages.add(n, attributes)

    tally, sdk = recorded("ledgerbus-router", routed), recorded("ledgerbus-router", counter)
    assert_valid(tally)
    assert samples(tally, "ledgerbus_router_messages_total") == samples(sdk, "ledgerbus_router_messages_total")
    assert {s.labels["verdict"]: s.value for s in samples(tally, "ledgerbus_router_messages_total")} == \
        {"accepted": 3, "rejected": 1}
    assert "# TYPE ledgerbus_router_messages_total counter" in tally


def test_merged_snapshots_declare_each_family_once_and_label_every_sample_with_its_process() -> None:
    router = recorded("ledgerbus-router", routed)
    replica_a = recorded("ledgerbus-agent-echo-1", ran(0.005, 0.2))
    replica_b = recorded("ledgerbus-agent-echo-1", ran(3.0))
    # A process of another version whose gauge clashes with the router's counter, and a
    # snapshot that is not the text format at all: left out, nothing else with them.
    clash = "# TYPE ledgerbus_router_messages_total gauge\nledgerbus_router_messages_total 7\n" + replica_a
    extra = GaugeMetricFamily("ledgerbus_stream_messages", "Messages a stream holds now", labels=["stream"])
    extra.add_metric(["AUDIT"], 12)

    merged = exposition.merge([
        Snapshot("router", "r1", router, 0.1), Snapshot("agent-echo-1", "a1", replica_a, 0.2),
        Snapshot("agent-echo-1", "b1", replica_b, 0.3), Snapshot("agent-x", "x1", "not { the format", 0.1),
        Snapshot("agent-old", "o1", clash, 0.1)], [extra]).decode()

    assert_valid(merged)
    by_process = Counter((s.labels[PROCESS_LABEL], s.labels[INSTANCE_LABEL]) for s in samples(merged, "target_info"))
    assert by_process == {("router", "r1"): 1, ("agent-echo-1", "a1"): 1, ("agent-echo-1", "b1"): 1,
                          ("agent-old", "o1"): 1}
    counted = {(s.labels["verdict"], s.labels[PROCESS_LABEL]): s.value
               for s in samples(merged, "ledgerbus_router_messages_total")}
    assert counted == {("accepted", "router"): 3, ("rejected", "router"): 1}
    assert [(s.labels["state"], s.value) for s in samples(merged, "ledgerbus_tasks")] == [("running", 2)]
    runs = {s.labels[INSTANCE_LABEL]: s.value for s in samples(merged, "ledgerbus_skill_duration_seconds_count")}
    assert runs == {"a1": 2, "b1": 1, "o1": 2}
    assert [s.labels for s in samples(merged, "ledgerbus_stream_messages")] == [{"stream": "AUDIT"}]


async def test_a_cli_principal_reads_each_live_snapshot_and_neither_a_stale_nor_a_stopped_one(
    running_router: RunningRouter, connect_as: Connect
) -> None:
    cli = await connect_as("cli-tester")
    reader = cli.jetstream(timeout=5)
    projector, agent = await connect_as("projector"), await connect_as("agent-echo-1")
    # The projector "dies" after one snapshot that promised the next within 50 ms.
    await projector.publish(subjects.metrics("projector", "p1"), recorded("ledgerbus-projector", routed).encode(),
                            headers={subjects.HDR_METRICS_INTERVAL: "0.05"})
    publisher = SnapshotPublisher()
    provider = MeterProvider(metric_readers=[publisher.reader])
    ran(0.02)(provider.get_meter("ledgerbus"))
    publisher.start(agent, "agent-echo-1", 60.0)
    try:
        async def live() -> set[str]:
            return {s.principal for s in await exposition.snapshots(reader)}

        async def only_the_agent() -> bool:
            return await live() == {"agent-echo-1"}

        await wait_until(only_the_agent, what="the projector's snapshot going stale")
        text = (await exposition.scrape(cli)).decode()
        assert_valid(text)
        assert [s.labels[PROCESS_LABEL] for s in samples(text, "ledgerbus_skill_duration_seconds_count")] == \
               ["agent-echo-1"]
        # The streams' sizes: every one of them is readable with a CLI principal's rights.
        assert {s.labels["stream"] for s in samples(text, "ledgerbus_stream_messages")} == set(exposition.STREAMS)
        await publisher.stop()  # a process stopping says goodbye: gone from the next read on
        assert await live() == set()
    finally:
        await publisher.stop()
        provider.shutdown()


async def test_the_gateway_serves_every_process_in_one_scrape_and_forgets_the_dead(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    often = {"LEDGERBUS_METRICS_INTERVAL_S": "0.5"}
    await procs.start("router", "router", **often)
    # Its snapshot would stay fresh for 90 s: only its goodbye can take it away sooner.
    projector = await procs.start("projector", "projector", LEDGERBUS_METRICS_INTERVAL_S="30")
    echo = await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", **often)
    port = _free_port()
    await procs.start("web", "web", "--port", str(port))
    token = {"Authorization": f"Bearer {tokens.issue(settings.auth_dir, 'cli-tester')}"}
    await wait_for_record(admin.jetstream(), joined("echo-1"))

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        for _ in range(200):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        r = await http.get("/metrics")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
        r = await http.post("/tasks", json={"skill": "echo", "input": {"n": 1}, "task_id": "metered"}, headers=token)
        assert r.status_code == 202, r.text

        text = ""

        async def scraped(done: Callable[[str], bool]) -> None:
            async def ready() -> bool:
                nonlocal text
                r = await http.get("/metrics", headers=token)
                assert r.status_code == 200, r.text
                assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
                text = r.text
                return done(text)
            await wait_until(ready, what="/metrics")

        def shows_the_task(text: str) -> bool:
            completed = [s for s in samples(text, "ledgerbus_router_messages_total")
                         if (s.labels["kind"], s.labels["verdict"], s.labels[PROCESS_LABEL]) ==
                         ("task_completed", "accepted", "router")]
            runs = [s for s in samples(text, "ledgerbus_skill_duration_seconds_count")
                    if s.labels[PROCESS_LABEL] == "agent-echo-1" and s.labels["ledgerbus_skill"] == "echo"]
            return bool(completed and runs)

        await scraped(shows_the_task)
        assert_valid(text)
        assert processes(text) == {"router", "projector", "agent-echo-1", "web"}  # the gateway's own too
        # Each process's own CPU and memory, from the same snapshot.
        assert {s.labels[PROCESS_LABEL] for s in samples(text, "process_resident_memory_bytes")} == processes(text)
        assert next(s.value for s in samples(text, "ledgerbus_stream_messages") if s.labels["stream"] == "AUDIT") >= 3
        assert "skill-echo" in {s.labels["consumer"] for s in samples(text, "ledgerbus_work_pending")}

        def without(principal: str) -> Callable[[str], bool]:
            return lambda text: principal not in processes(text)

        echo.kill9()  # no goodbye: gone once its snapshot is three intervals old
        await scraped(without("agent-echo-1"))
        await projector.stop()  # a stopping process says goodbye: gone from the next scrape on
        r = await http.get("/metrics", headers=token)
        assert without("projector")(r.text) and not without("router")(r.text), r.text
