"""Idempotent provisioning of the streams, consumers and buckets DESIGN.md specifies.

Run by the router at start (it is the one principal allowed to manage these streams)
and by tests. Re-running is harmless: existing streams are updated to the settings here,
so a changed setting takes effect on the next router start. That includes the number of
replicas (``LEDGERBUS_STREAM_REPLICAS``): on a cluster JetStream adds or drops the copies
of a stream, and of its consumers, in place, so streams made at R1 become R3 by restarting
the router with 3. On a cluster still forming (no meta leader yet, or not every node known
to be online), provisioning waits for it for up to ``connect_timeout_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
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
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from ledgerbus.bus import subjects
from ledgerbus.bus.errors import BusError
from ledgerbus.bus.settings import Settings

log = structlog.get_logger(__name__)


AUDIT_ID_WINDOW_S = 5.0
"""How long AUDIT remembers a record's ``Nats-Msg-Id`` (its de-duplication window)."""


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The INGRESS, AUDIT, WORK, DEADLETTERS, TRACES, METRICS and LLMCALLS stream configurations,
    each with ``stream_replicas`` copies."""
    return [
        StreamConfig(
            name=subjects.INGRESS_STREAM,
            subjects=[subjects.INGRESS_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
            duplicate_window=settings.duplicate_window_s,
            max_msg_size=settings.max_message_bytes * 4,
            description="every message to the router; a PubAck means durably received",
        ),
        StreamConfig(
            name=subjects.AUDIT_STREAM,
            subjects=[subjects.AUDIT_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
            deny_delete=True,
            # Purged only below a cut the chain records first (router/retention.py);
            # provision() keeps deny_purge on a stream made with it (JetStream cannot lift it).
            deny_purge=False,
            allow_rollup_hdrs=False,
            max_age=0,
            # A record's id (its hash) only links it to the next record of the same batch
            # (router/audit.py): JetStream need remember ids for moments, not the default 2 min.
            duplicate_window=AUDIT_ID_WINDOW_S,
            allow_direct=True,
            description="the event log: one hash-chained record per ingress message",
        ),
        StreamConfig(
            name=subjects.WORK_STREAM,
            subjects=[subjects.WORK_ALL, subjects.ASSIGN_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
            discard=DiscardPolicy.NEW,
            duplicate_window=settings.duplicate_window_s,
            description="dispatched tasks: a shared consumer per skill, and one per agent for work assigned to it",
        ),
        StreamConfig(
            name=subjects.DEADLETTER_STREAM,
            subjects=[subjects.DEADLETTER_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
            description="advisories of WORK messages that reached MaxDeliver: the router dead-letters their tasks",
        ),
        StreamConfig(
            name=subjects.TRACES_STREAM,
            subjects=[subjects.TRACES_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
            discard=DiscardPolicy.OLD,
            max_age=settings.traces_max_age_s,
            max_bytes=settings.traces_max_bytes,
            description="finished OpenTelemetry spans for agentctl trace; short retention, best effort",
        ),
        StreamConfig(
            name=subjects.METRICS_STREAM,
            subjects=[subjects.METRICS_ALL],
            retention=RetentionPolicy.LIMITS,
            # On file although each snapshot is replaced within seconds: a memory stream
            # does not outlive a restart of a lone nats-server, and only the router's start
            # would make it again.
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
            discard=DiscardPolicy.OLD,
            max_msgs_per_subject=1,
            max_age=METRICS_MAX_AGE_S,
            max_bytes=METRICS_MAX_BYTES,
            allow_direct=True,
            description="the latest metrics snapshot of each process (Prometheus text) for the gateway's /metrics",
        ),
        StreamConfig(
            name=subjects.LLMCALLS_STREAM,
            subjects=[subjects.LLMCALLS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
            # Content-addressed (the subject's token is the sha256 of the body): the first
            # write of a call stays, a second one under its name is refused.
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=1,
            max_msgs=LLMCALLS_MAX_MSGS,
            max_age=settings.llm_calls_max_age_s,
            max_msg_size=settings.llm_record_max_bytes + 4096,
            duplicate_window=settings.duplicate_window_s,
            allow_direct=True,
            description="recorded LLM calls (request and answer) by content hash, named by task_usage records",
        ),
    ]


LLMCALLS_MAX_MSGS = 10_000_000
"""A bound JetStream asks of a per-subject discard policy; the age is what limits LLMCALLS."""

METRICS_MAX_AGE_S = 3600.0
"""How long a process's last snapshot stays in METRICS: the gateway stops showing it much
sooner (three of its intervals), this only bounds what processes gone for good leave."""
METRICS_MAX_BYTES = 32 * 1024 * 1024
"""METRICS's size cap: a snapshot is some kilobytes, one per live process."""


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
    return _work_consumer(settings, subjects.work_consumer(skill), subjects.work(skill))


def assigned_consumer_config(settings: Settings, agent: str) -> ConsumerConfig:
    """The durable pull consumer of the work assigned to ``agent``, shared by its instances."""
    return _work_consumer(settings, subjects.assigned_consumer(agent), subjects.assigned_all(agent))


def _work_consumer(settings: Settings, name: str, filter_subject: str) -> ConsumerConfig:
    """A WORK consumer. Named (not only durable), so nats.py creates it with the filtered API
    subject ``$JS.API.CONSUMER.CREATE.WORK.<name>.<filter>``, whose filter the server checks
    against the configuration: that is the only create an agent's permissions allow, so no
    agent can make a consumer of another's name that reads another subject."""
    return ConsumerConfig(
        name=name,
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.work_ack_wait_s,
        max_deliver=settings.work_max_deliver,
        filter_subject=filter_subject,
    )


STREAM_NAME_IN_USE = 10058
"""JetStream's error code for a stream (or bucket) that exists with another configuration."""
_NO_SUITABLE_PEERS = 10005
"""JetStream's error code for replicas it cannot place: on a cluster still forming, not every
node is known to be online yet."""


def transient(exc: BaseException) -> bool:
    """Whether a JetStream API error passes by itself: a cluster still forming or electing
    has no meta leader yet (503, no answer) or cannot place replicas yet."""
    if isinstance(exc, nats.js.errors.ServiceUnavailableError | nats.errors.NoRespondersError | TimeoutError):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code == _NO_SUITABLE_PEERS


async def _retrying(step: Callable[[], Awaitable[None]], settings: Settings, what: str) -> None:
    """``step()``, again while it fails transiently, for up to ``connect_timeout_s``: the
    router may start while the cluster it provisions on is still forming."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout_s
    delay = 0.1
    while True:
        try:
            return await step()
        except (nats.errors.Error, TimeoutError) as exc:
            if not transient(exc) or loop.time() >= deadline:
                raise
            log.info("provision_waiting", what=what, error=str(exc))
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def chain_bucket_config(settings: Settings) -> KeyValueConfig:
    """The ``chain`` bucket: the anchor of the audit chain (``bus/anchor.py``). No TTL, and
    history, so the anchors before the newest stay to be looked at."""
    return KeyValueConfig(
        bucket=subjects.CHAIN_BUCKET,
        history=subjects.CHAIN_HISTORY,
        storage=StorageType.FILE,
        direct=True,
        replicas=settings.stream_replicas,
        description="the audit chain's anchor: the router's last signed checkpoint",
    )


def snapshot_store_config(settings: Settings) -> ObjectStoreConfig:
    """The ``snapshots`` object store: the router's signed snapshots of its state
    (``router/snapshots.py``). An object store, not a KV bucket, because a snapshot may be
    larger than a message; no TTL: the router deletes all but the newest few itself."""
    return ObjectStoreConfig(
        storage=StorageType.FILE,
        replicas=settings.stream_replicas,
        description="the router's signed snapshots of its folded state",
    )


def projection_store_config(settings: Settings) -> ObjectStoreConfig:
    """The ``projections`` object store: snapshots of the projection database
    (``projections/snapshots.py``), written by projectors, read by them and by
    ``agentctl replay``; no TTL: a projector deletes all but the newest few itself."""
    return ObjectStoreConfig(
        storage=StorageType.FILE,
        replicas=settings.stream_replicas,
        description="snapshots of the projection database at a log position",
    )


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Create or update every stream, the ``agents`` and ``chain`` buckets and the
    ``snapshots`` and ``projections`` object stores."""

    async def stream(config: StreamConfig) -> None:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            # The stream exists with other settings: bring it to ours, except deny_purge,
            # which JetStream cannot lift (an AUDIT made before retention keeps it, and
            # router/retention.py then archives nothing, saying so).
            if config.deny_purge is False and (await js.stream_info(config.name or "")).config.deny_purge:
                config = dataclasses.replace(config, deny_purge=True)
            await js.update_stream(config)

    async def bucket(config: KeyValueConfig) -> None:
        try:
            await js.create_key_value(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            # It exists: it keeps the TTL it was made with, but follows the replica count.
            await ensure_replicas(js, subjects.kv_stream(config.bucket), settings.stream_replicas)

    agents = KeyValueConfig(
        bucket=subjects.AGENTS_BUCKET,
        ttl=settings.agents_ttl_s,
        history=1,
        storage=StorageType.FILE,
        direct=True,
        replicas=settings.stream_replicas,
        description="agent heartbeats and live load",
    )

    for config in stream_configs(settings):
        try:
            await _retrying(functools.partial(stream, config), settings, f"stream {config.name}")
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot provision stream {config.name}: {exc}{_replicas_hint(settings)}") from exc
    for kv in (agents, chain_bucket_config(settings)):
        try:
            await _retrying(functools.partial(bucket, kv), settings, f"bucket {kv.bucket}")
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot provision bucket {kv.bucket}: {exc}{_replicas_hint(settings)}") from exc

    async def objects(bucket: str, config: ObjectStoreConfig) -> None:
        try:
            await js.create_object_store(bucket, config=config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            await ensure_replicas(js, subjects.obj_stream(bucket), settings.stream_replicas)

    stores = {subjects.SNAPSHOT_BUCKET: snapshot_store_config(settings),
              subjects.PROJECTION_BUCKET: projection_store_config(settings)}
    for bucket_name, store_config in stores.items():
        try:
            await _retrying(functools.partial(objects, bucket_name, store_config), settings,
                            f"object store {bucket_name}")
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot provision object store {bucket_name}: {exc}{_replicas_hint(settings)}") from exc
    log.info("provisioned", streams=[c.name for c in stream_configs(settings)],
             buckets=[subjects.AGENTS_BUCKET, subjects.CHAIN_BUCKET, *stores], replicas=settings.stream_replicas)


def _replicas_hint(settings: Settings) -> str:
    # The server's own words for R3 on one server ("replicas > 1 not supported in
    # non-clustered mode") do not name the setting that asked for it.
    if settings.stream_replicas == 1:
        return ""
    return (f" (LEDGERBUS_STREAM_REPLICAS={settings.stream_replicas} needs a JetStream cluster of at least "
            f"{settings.stream_replicas} servers, see docs/deployment.md)")


async def ensure_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Bring an existing stream (a bucket's) to ``replicas`` copies, leaving the rest of its
    configuration as it was made."""
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) != replicas:
        await js.update_stream(info.config, num_replicas=replicas)
        log.info("replicas_changed", stream=stream, replicas=replicas)


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
