"""W3C trace context in NATS headers, and the tracer provider each process installs.

The ``traceparent`` header rides on every message, INGRESS to WORK and back, so one
task is one trace across the CLI, the router, the agents and the projector. Spans are
exported over OTLP only when the standard ``OTEL_EXPORTER_OTLP_*`` variables name an
endpoint; otherwise they are recorded (so ids exist and propagate) but sent nowhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()

_OTLP_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configure_tracing(service_name: str) -> TracerProvider:
    """Install an SDK tracer provider for this process (call once, in the entry point)."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if any(os.environ.get(v) for v in _OTLP_VARS):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def inject(headers: dict[str, str] | None = None, context: otel_context.Context | None = None) -> dict[str, str]:
    """Return ``headers`` plus the ``traceparent`` of ``context`` (default: the current span)."""
    carrier = dict(headers or {})
    _propagator.inject(carrier, context=context)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by a message's headers (empty context if none)."""
    return _propagator.extract(dict(headers or {}))


def trace_id_of_span(span: trace.Span) -> str:
    """A span's trace id as 32 hex digits, or '' for a non-recording span."""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
