"""Metrics as Prometheus reads them: each process's snapshot on METRICS.

Every process has, beside its TRACES exporter (:mod:`bus.tracing`), a
:class:`SnapshotPublisher`: every ``LEDGERBUS_METRICS_INTERVAL_S`` it renders what the
process's meter provider recorded in the Prometheus text format, through the OpenTelemetry
Prometheus exporter (so the names are the specification's: dots become underscores, the
unit a suffix, a counter ends in ``_total``), and publishes it on
``metrics.<principal>.<instance>``. METRICS keeps one message per subject: the latest
snapshot of each process.

Nothing here runs per message: recording stays the instruments' own work, rendering runs
on a worker thread once an interval, and publishing is one publish awaited on a task of
its own, which a missing server or stream turns into a log line, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import nats.errors
import structlog
from nats.aio.client import Client
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from ledgerbus.bus import subjects

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT_S = 5.0
RETRY_S = 1.0
"""How soon a snapshot that was not stored is tried again (at most its interval)."""
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
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        nc, subject, headers = self._last
        if nc.is_connected:
            try:
                await nc.jetstream(timeout=PUBLISH_TIMEOUT_S).publish(subject, b"",
                                                                      headers={**headers, **GOODBYE})
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("metrics_goodbye_failed", error=str(exc))
