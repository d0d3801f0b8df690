"""Idempotent provisioning of the streams, consumers and buckets DESIGN.md specifies.

Run by the router at start (it is the one principal allowed to manage these streams)
and by tests. Re-running is harmless: existing streams are updated to the settings here,
so a changed setting takes effect on the next router start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bus import subjects
from bus.errors import BusError
from bus.settings import Settings

log = structlog.get_logger(__name__)


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The INGRESS, AUDIT, WORK, DEADLETTERS and TRACES stream configurations."""
    return [
        StreamConfig(
            name=subjects.INGRESS_STREAM,
            subjects=[subjects.INGRESS_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=settings.duplicate_window_s,
            max_msg_size=settings.max_message_bytes * 4,
            description="every message to the router; a PubAck means durably received",
        ),
        StreamConfig(
            name=subjects.AUDIT_STREAM,
            subjects=[subjects.AUDIT_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            deny_delete=True,
            deny_purge=True,
            allow_rollup_hdrs=False,
            max_age=0,
            allow_direct=True,
            description="the event log: one hash-chained record per ingress message",
        ),
        StreamConfig(
            name=subjects.WORK_STREAM,
            subjects=[subjects.WORK_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            duplicate_window=settings.duplicate_window_s,
            description="dispatched tasks, one durable pull consumer per skill",
        ),
        StreamConfig(
            name=subjects.DEADLETTER_STREAM,
            subjects=[subjects.DEADLETTER_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            description="advisories of WORK messages that reached MaxDeliver: the router dead-letters their tasks",
        ),
        StreamConfig(
            name=subjects.TRACES_STREAM,
            subjects=[subjects.TRACES_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=settings.traces_max_age_s,
            max_bytes=settings.traces_max_bytes,
            description="finished OpenTelemetry spans for agentctl trace; short retention, best effort",
        ),
    ]


def router_consumer_config(settings: Settings) -> ConsumerConfig:
    """The router's durable pull consumer on INGRESS."""
    return ConsumerConfig(
        durable_name=subjects.ROUTER_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ingress_ack_wait_s,
        max_ack_pending=max(settings.router_batch * 4, 1024),
        filter_subject=subjects.INGRESS_ALL,
    )


def deadletter_consumer_config() -> ConsumerConfig:
    """The router's durable pull consumer on DEADLETTERS."""
    return ConsumerConfig(
        durable_name=subjects.DEADLETTER_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30,
        filter_subject=subjects.DEADLETTER_ALL,
    )


def work_consumer_config(settings: Settings, skill: str) -> ConsumerConfig:
    """The durable pull consumer shared by every agent replica with ``skill``."""
    return ConsumerConfig(
        durable_name=subjects.work_consumer(skill),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.work_ack_wait_s,
        max_deliver=settings.work_max_deliver,
        filter_subject=subjects.work(skill),
    )


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Create or update every stream and the ``agents`` bucket."""
    for config in stream_configs(settings):
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # The stream exists with other settings: bring it to ours.
            await js.update_stream(config)
        except nats.errors.Error as exc:
            raise BusError(f"cannot provision stream {config.name}: {exc}") from exc
    try:
        await js.create_key_value(
            KeyValueConfig(
                bucket=subjects.AGENTS_BUCKET,
                ttl=settings.agents_ttl_s,
                history=1,
                storage=StorageType.FILE,
                direct=True,
                description="agent heartbeats and live load",
            )
        )
    except nats.js.errors.BadRequestError:
        log.debug("agents_bucket_exists")
    except nats.errors.Error as exc:
        raise BusError(f"cannot provision bucket {subjects.AGENTS_BUCKET}: {exc}") from exc
    log.info("provisioned", streams=[c.name for c in stream_configs(settings)], bucket=subjects.AGENTS_BUCKET)


async def wait_for_stream(
    js: JetStreamContext,
    stream: str,
    timeout: float,
    on_wait: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Wait until the router has provisioned ``stream`` (processes may start in any order)."""
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.05
    while True:
        try:
            await js.stream_info(stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        except TimeoutError:
            pass
        if asyncio.get_running_loop().time() >= deadline:
            raise BusError(f"stream {stream} does not exist after {timeout:.0f}s: is the router running?")
        if on_wait is not None:
            await on_wait()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
