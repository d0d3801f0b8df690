"""Finished spans as they travel on the TRACES stream, and their OTLP/JSON form.

A process publishes the spans it finishes as one :class:`SpanBatch` per trace on
``traces.<trace id>.<principal>`` (:class:`bus.tracing.BusSpanExporter`).
``agentctl trace`` reads them back, draws the tree, and with ``--json`` prints the
OTLP/JSON shape (``resourceSpans`` → ``scopeSpans`` → ``spans``, ids in hex, times in
nanoseconds as strings) that OTLP tools and Jaeger's UI load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

# OTLP numbering (opentelemetry.proto.trace.v1.Span.SpanKind / Status.StatusCode).
KIND_NAMES = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


class SpanEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Something that happened at one instant of a span (an exception, say)."""

    name: str
    time_ns: int
    attributes: dict[str, Any] = {}


class SpanRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One finished span. Ids are lower-case hex (32 and 16 digits), kinds and status
    codes use OTLP's numbering."""

    trace_id: str
    span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    parent_span_id: str = ""
    status: int = STATUS_UNSET
    status_message: str = ""
    attributes: dict[str, Any] = {}
    events: list[SpanEvent] = []
    scope: str = ""

    @property
    def duration_ns(self) -> int:
        """How long the span lasted."""
        return max(0, self.end_ns - self.start_ns)

    @property
    def failed(self) -> bool:
        """Whether the span ended with an error status."""
        return self.status == STATUS_ERROR


class SpanBatch(msgspec.Struct, frozen=True, kw_only=True):
    """Spans of one trace from one process, with that process's resource attributes
    (``service.name`` among them)."""

    resource: dict[str, Any]
    spans: list[SpanRecord]

    @property
    def service(self) -> str:
        """The service that recorded the spans."""
        return str(self.resource.get("service.name", "unknown"))


_batch_decoder = msgspec.json.Decoder(SpanBatch)


def decode_batch(data: bytes) -> SpanBatch:
    """Decode one TRACES message (raises ``msgspec.DecodeError`` if it is not one)."""
    return _batch_decoder.decode(data)


def _any_value(value: Any) -> dict[str, Any]:
    """An attribute value as an OTLP/JSON ``AnyValue``."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _key_values(attributes: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "value": _any_value(value)} for key, value in attributes.items()]


def otlp_span(span: SpanRecord) -> dict[str, Any]:
    """One span in OTLP/JSON form."""
    out: dict[str, Any] = {
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name,
        "kind": span.kind,
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(span.end_ns),
        "attributes": _key_values(span.attributes),
        "events": [{"timeUnixNano": str(e.time_ns), "name": e.name, "attributes": _key_values(e.attributes)}
                   for e in span.events],
        "status": {"code": span.status, **({"message": span.status_message} if span.status_message else {})},
    }
    if span.parent_span_id:
        out["parentSpanId"] = span.parent_span_id
    return out


def to_otlp_json(batches: Iterable[SpanBatch]) -> dict[str, Any]:
    """Batches as one OTLP/JSON ``ExportTraceServiceRequest`` (one resource per service)."""
    by_service: dict[str, tuple[dict[str, Any], dict[str, list[SpanRecord]]]] = {}
    for batch in batches:
        _, scopes = by_service.setdefault(batch.service, (batch.resource, {}))
        for span in batch.spans:
            scopes.setdefault(span.scope, []).append(span)
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _key_values(resource)},
                "scopeSpans": [
                    {"scope": {"name": scope}, "spans": [otlp_span(s) for s in sorted(spans, key=_start)]}
                    for scope, spans in sorted(scopes.items())
                ],
            }
            for _, (resource, scopes) in sorted(by_service.items())
        ]
    }


def _start(span: SpanRecord) -> tuple[int, str]:
    return span.start_ns, span.span_id


def unique(batches: Sequence[SpanBatch]) -> list[tuple[str, SpanRecord]]:
    """``(service, span)`` for every span, each span id once (a re-published batch is
    not counted twice), in start order."""
    seen: dict[str, tuple[str, SpanRecord]] = {}
    for batch in batches:
        for span in batch.spans:
            seen.setdefault(span.span_id, (batch.service, span))
    return sorted(seen.values(), key=lambda pair: _start(pair[1]))
