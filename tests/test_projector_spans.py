"""The projector's ``projector.apply`` spans: one for each outcome record of a sampled
trace, none for an unsampled one, and each ends once its record's commit is known, not
before, without making the projector wait for a commit it would not otherwise wait for."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import TaskCancelled, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import projector
from ledgerbus.projections.projector import OpenSpans, Projector, apply_spans
from ledgerbus.projections.writer import TRACKING_NAME
from tests.conftest import RunningRouter
from tests.support import wait_for_records

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00"


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(projector, "tracer", provider.get_tracer("ledgerbus.projector"))
    yield exporter
    provider.shutdown()


def record(seq: int, subject: str, traceparent: str, age_s: float = 0.0) -> Msg:
    stored_ns = int((time.time() - age_s) * 1e9)
    return Msg(_client=None, subject=subject, data=b"{}",  # type: ignore[arg-type]
               reply=f"$JS.ACK.AUDIT.projector.1.{seq}.{seq}.{stored_ns}.0",
               headers={"traceparent": traceparent} if traceparent else None)


def test_only_a_sampled_traces_fresh_outcome_gets_a_span(memory: InMemorySpanExporter) -> None:
    batch = [
        record(5, "audit.accepted.task_completed.t1", SAMPLED),
        record(6, "audit.accepted.task_completed.t2", UNSAMPLED),  # unsampled: nothing records it
        record(7, "audit.accepted.task_submitted.t3", SAMPLED),  # not an outcome
        record(8, "audit.rejected.task_completed.t4", SAMPLED, age_s=3600),  # its trace is gone from TRACES
        record(9, "audit.rejected.task_progress.t5", SAMPLED),  # a rejection is an outcome
        record(10, "audit.accepted.task_failed.t6", ""),  # no trace at all
    ]
    spans = apply_spans(batch, max_age_s=60)
    assert [seq for seq, _ in spans] == [5, 9]
    assert all(span.is_recording() for _, span in spans)
    assert memory.get_finished_spans() == ()  # none ends before its commit


def test_a_span_ends_once_its_record_is_committed_and_not_before(memory: InMemorySpanExporter) -> None:
    spans = OpenSpans()
    spans.add(apply_spans([record(5, "audit.accepted.task_completed.t1", SAMPLED),
                           record(9, "audit.accepted.task_failed.t2", SAMPLED)], max_age_s=60))
    spans.committed(4)
    assert memory.get_finished_spans() == ()
    spans.committed(5)
    (first,) = memory.get_finished_spans()
    assert first.name == "projector.apply" and first.attributes is not None
    assert first.attributes["ledgerbus.audit.seq"] == 5
    assert first.parent is not None and first.parent.span_id == int(SAMPLED.split("-")[2], 16)
    spans.committed(8)
    assert len(memory.get_finished_spans()) == 1
    spans.committed(20)
    assert [s.attributes["ledgerbus.audit.seq"] for s in memory.get_finished_spans()  # type: ignore[index]
            ] == [5, 9]
    assert all(s.status.status_code != StatusCode.ERROR for s in memory.get_finished_spans())


def test_a_projector_that_stops_before_the_commit_ends_the_span_as_failed(memory: InMemorySpanExporter) -> None:
    spans = OpenSpans()
    spans.add(apply_spans([record(5, "audit.accepted.task_completed.t1", SAMPLED)], max_age_s=60))
    spans.failed("UnreadableRecord: audit seq 5")
    (span,) = memory.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "UnreadableRecord: audit seq 5"
    spans.committed(5)  # nothing is left to end twice
    assert len(memory.get_finished_spans()) == 1


class CommittedAtEnd(SpanProcessor):
    """Notes, as each span ends, the position the projection's file holds at that moment."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.ended: list[tuple[int, int]] = []  # (the span's record, the file's position)

    def on_end(self, span: ReadableSpan) -> None:
        with sqlite3.connect(self.db) as conn:
            (position,) = conn.execute("SELECT position FROM tracking WHERE name = ?", (TRACKING_NAME,)).fetchone()
        assert span.attributes is not None
        self.ended.append((int(span.attributes["ledgerbus.audit.seq"]), position))  # type: ignore[arg-type]


async def test_the_running_projector_ends_a_sampled_outcomes_span_after_its_commit_and_none_for_unsampled(
    running_router: RunningRouter, connect_as: Callable[[str], Awaitable[Client]], admin: Client,
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
    ends = CommittedAtEnd(str(settings.db_path))
    provider.add_span_processor(ends)
    monkeypatch.setattr(projector, "tracer", provider.get_tracer("ledgerbus.projector"))
    running = Projector(await connect_as("projector"), settings)
    stop = asyncio.Event()
    task = asyncio.create_task(running.run(stop))
    try:
        await asyncio.wait_for(running.serving.wait(), 10)
        js = admin.jetstream()
        start = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
        cli = (await connect_as("cli")).jetstream()
        # Cancels of tasks nobody submitted: each is rejected, an outcome the projector shows.
        for traceparent in (UNSAMPLED, SAMPLED):
            await cli.publish(subjects.ingress(subjects.principal("cli", "ops"), "task_cancelled"),
                              codec.encode(TaskCancelled(id=new_id(), task_id=f"nobody-{traceparent[-1]}")),
                              headers={"traceparent": traceparent})
        await wait_for_records(js, start + 2)
        async with asyncio.timeout(30):
            while running.position < start + 2 or not ends.ended:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task
        provider.shutdown()
    # Only the sampled one's span; it ended once the file held its record, not before.
    assert [seq for seq, _ in ends.ended] == [start + 2]
    (seq, position), = ends.ended
    assert position >= seq
