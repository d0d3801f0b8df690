"""The OpenTelemetry metrics ledgerbus records, named in one place.

Instruments come from the global meter provider, which :func:`bus.tracing.configure_telemetry`
installs: a serving process publishes them to METRICS (for the gateway's ``/metrics``) and
exports them over OTLP with the same ``OTEL_*`` settings as traces. Names follow the
OpenTelemetry conventions (``gen_ai.client.*`` for LLM calls); docs/observability.md
lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

meter = metrics.get_meter("ledgerbus")

router_messages = meter.create_counter(
    "ledgerbus.router.messages", unit="{message}",
    description="Messages the router audited, by kind, verdict (accepted/rejected) and code")
skill_duration = meter.create_histogram(
    "ledgerbus.skill.duration", unit="s",
    description="How long a skill ran on an agent, by skill, agent and outcome")
llm_token_usage = meter.create_histogram(
    "gen_ai.client.token.usage", unit="{token}",
    description="Tokens per LLM call, by gen_ai.token.type (input/output), system and model")
llm_duration = meter.create_histogram(
    "gen_ai.client.operation.duration", unit="s",
    description="LLM call latency, by system, model and outcome")
projector_applied = meter.create_counter(
    "ledgerbus.projector.records", unit="{record}",
    description="Audit records the projector applied to its database")


def observe(name: str, unit: str, description: str,
            read: Callable[[], Mapping[tuple[tuple[str, str], ...], float]]) -> None:
    """Register an observable gauge whose points ``read()`` returns as
    ``{((attribute, value), ...): value}``. ``read`` runs on the exporter's thread, so it
    must only read a snapshot the owner replaces whole, never iterate live state."""

    def callback(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, dict(attrs)) for attrs, value in read().items()]

    meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)
