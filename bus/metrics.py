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

# Histogram buckets. The SDK's default ones (0, 5, 10, 25 ... 10000) are made for
# milliseconds: in seconds nearly every run would fall in the first one, and no quantile
# could be read from them (in Prometheus, histogram_quantile). The GenAI ones are those
# the OpenTelemetry GenAI conventions advise.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
GEN_AI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


class Tally:
    """A counter kept in this process and read by the SDK when it collects (an observable
    counter): to every exporter a cumulative, monotonic sum, as a ``Counter`` is.

    :meth:`add` is a dict update, under a microsecond. A ``Counter``'s add goes through the
    SDK's measurement pipeline each time (the attributes hashed, a lock, the aggregation of
    every reader): one task at a time, with every process woken for it, the router's add
    and the projector's cost a lone task about a tenth of a millisecond (docs/benchmarks.md).
    """

    def __init__(self, name: str, unit: str, description: str, on: metrics.Meter | None = None) -> None:
        self._counts: dict[tuple[tuple[str, str], ...], int] = {}
        (on or meter).create_observable_counter(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: int, attributes: Mapping[str, str] | None = None) -> None:
        """Count ``amount`` more under ``attributes``."""
        key = tuple(sorted(attributes.items())) if attributes else ()
        self._counts[key] = self._counts.get(key, 0) + amount

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        # On the exporter's thread while the event loop adds: the copy is one C call under
        # the GIL, so the loop never changes the dict while it is read.
        return [Observation(value, dict(key)) for key, value in self._counts.copy().items()]


router_messages = Tally(
    "ledgerbus.router.messages", unit="{message}",
    description="Messages the router audited, by kind, verdict (accepted/rejected) and code")
skill_duration = meter.create_histogram(
    "ledgerbus.skill.duration", unit="s",
    description="How long a skill ran on an agent, by skill, agent and outcome",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
llm_token_usage = meter.create_histogram(
    "gen_ai.client.token.usage", unit="{token}",
    description="Tokens per LLM call, by gen_ai.token.type (input/output), system and model",
    explicit_bucket_boundaries_advisory=GEN_AI_TOKEN_BUCKETS)
llm_duration = meter.create_histogram(
    "gen_ai.client.operation.duration", unit="s",
    description="LLM call latency, by system, model and outcome",
    explicit_bucket_boundaries_advisory=GEN_AI_DURATION_BUCKETS)
projector_applied = Tally(
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
