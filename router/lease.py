"""The leader lease: at most one router serves; a standby takes over when the leader's
lease lapses.

The lease is the ``leader`` key of the ``router`` KV bucket, whose TTL is the lease's
length: the leader rewrites the key every third of it, each write conditional on the
revision it last wrote (compare-and-set), so a leader that has lost the key cannot take it
back by writing. A standby tries to create the key, which succeeds only once it is gone:
deleted by a leader stopping cleanly, or expired by the server because the leader stopped
renewing (killed, paused, cut off). Time is the server's (the TTL) for taking over, and
the holder's own monotonic clock for stepping down: a leader treats its lease as lost once
``lost_after`` of the TTL has passed since its last successful renewal, before the server
can have expired it, and so stops acting before anyone else may start.

The lease is not what keeps the audit chain whole: every append carries
``Nats-Expected-Last-Sequence`` and, within a batch, ``Nats-Expected-Last-Msg-Id``
(router/audit.py), so a leader that wakes from a pause and writes with a stale head is
refused by JetStream whatever it believes about its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from ledgerbus.bus import subjects
from ledgerbus.bus.errors import BusError
from ledgerbus.bus.provision import STREAM_NAME_IN_USE, ensure_replicas, transient

log = structlog.get_logger(__name__)

LOST_AFTER = 0.8
"""The share of the TTL after the last renewal at which the holder stops acting."""


class Holder(msgspec.Struct, frozen=True):
    """Who holds the lease (the key's value, for people and ``agentctl doctor``)."""

    instance: str
    host: str
    pid: int


def instance_id() -> str:
    """This router process, as the lease names it."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Lease:
    """The router's leader lease in the ``router`` bucket (``ttl_s`` long)."""

    def __init__(self, js: JetStreamContext, ttl_s: float, instance: str | None = None, replicas: int = 1) -> None:
        self.js = js
        self.ttl_s = ttl_s
        self.replicas = replicas
        """Copies of the bucket (``stream_replicas``): on a cluster the lease must outlive a server."""
        self.instance = instance or instance_id()
        self.revision = 0
        self.renewed_at = 0.0
        self._kv: KeyValue | None = None
        self._value = msgspec.json.encode(Holder(self.instance, socket.gethostname(), os.getpid()))

    async def bucket(self) -> KeyValue:
        """The ``router`` bucket, made with this lease's TTL and replicas if it does not exist
        yet; an existing one keeps its TTL but is brought to this lease's replicas."""
        if self._kv is None:
            try:
                self._kv = await self.js.create_key_value(KeyValueConfig(
                    bucket=subjects.ROUTER_BUCKET, ttl=self.ttl_s, history=1, storage=StorageType.FILE,
                    direct=True, replicas=self.replicas,
                    description="the router's leader lease: key leader, TTL = the lease",
                ))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise  # a cluster still placing replicas: acquire() tries again
                # It exists (made by an earlier router, perhaps with another TTL: that one holds).
                await ensure_replicas(self.js, f"KV_{subjects.ROUTER_BUCKET}", self.replicas)
                self._kv = await self.js.key_value(subjects.ROUTER_BUCKET)
            except nats.errors.Error as exc:
                if transient(exc):
                    raise  # no meta leader yet: acquire() tries again
                raise BusError(f"cannot provision bucket {subjects.ROUTER_BUCKET}: {exc}") from exc
        return self._kv

    @property
    def held(self) -> bool:
        """Whether this process may act as the leader now (by its own clock)."""
        return self.revision > 0 and time.monotonic() - self.renewed_at < self.ttl_s * LOST_AFTER

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; whether this process now does."""
        kv = await self.bucket()
        started = time.monotonic()
        try:
            self.revision = await kv.create(subjects.ROUTER_LEADER_KEY, self._value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        self.renewed_at = started
        log.info("lease_acquired", instance=self.instance, ttl_s=self.ttl_s, revision=self.revision)
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the lease (``False`` if ``stop`` came first)."""
        waiting = False
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    return True
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("lease_unavailable", error=str(exc))
            if not waiting:
                waiting = True
                log.info("standby", instance=self.instance, holder=await self.holder())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.ttl_s / 4)
        return False

    async def renew(self) -> bool:
        """Rewrite the key if it is still ours; whether this process still holds the lease.

        A refused write means someone else holds it now: lost for good. A write that did
        not get through (no connection) leaves the lease to the clock.
        """
        if self.revision == 0:
            return False
        kv = await self.bucket()
        started = time.monotonic()
        try:
            self.revision = await kv.update(subjects.ROUTER_LEADER_KEY, self._value, last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.warning("lease_lost", instance=self.instance, holder=await self.holder())
            self.revision = 0
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("lease_renew_failed", error=str(exc))
            return self.held
        self.renewed_at = started
        return self.held

    async def keep(self, lost: asyncio.Event) -> None:
        """Renew every third of the TTL until the lease is lost (then set ``lost``)."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            if not await self.renew():
                lost.set()
                return

    def drop(self) -> None:
        """Forget the lease without touching the key (it is someone else's, or will be)."""
        self.revision = 0

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait the TTL."""
        if self.revision == 0:
            return
        kv = await self.bucket()
        try:
            await kv.delete(subjects.ROUTER_LEADER_KEY, last=self.revision)
            log.info("lease_released", instance=self.instance)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("lease_release_failed", error=str(exc))
        self.revision = 0

    async def holder(self) -> str:
        """Who holds the lease now, as far as the bucket says ('' if nobody)."""
        try:
            entry = await (await self.bucket()).get(subjects.ROUTER_LEADER_KEY)
            return msgspec.json.decode(entry.value or b"{}", type=Holder).instance
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError):
            return ""
