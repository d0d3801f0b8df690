"""MaxDeliver advisories: JetStream's word that it gave up redelivering a WORK message.

A background task fetches them from DEADLETTERS into a list; the router's serving loop,
which alone appends to the log, dead-letters their tasks from there (``Router._dead_letters``).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ledgerbus.bus.connection import cancel_requested

log = structlog.get_logger(__name__)

BACKLOG = 64
"""Advisories held for the serving loop at most; the rest wait in DEADLETTERS."""


class MaxDeliverAdvisory(msgspec.Struct, frozen=True):
    """The fields of JetStream's ``io.nats.jetstream.advisory.v1.max_deliver`` we use."""

    stream_seq: int
    deliveries: int = 0


async def fetch(sub: JetStreamContext.PullSubscription, into: list[Msg]) -> None:
    """Fetch advisories into ``into`` until cancelled (then unsubscribe)."""
    try:
        while not cancel_requested():
            if len(into) >= BACKLOG:
                await asyncio.sleep(0.1)
                continue
            try:
                into += await sub.fetch(16, timeout=1.0)
            except TimeoutError:
                continue
            except nats.errors.Error as exc:
                log.warning("deadletter_fetch_failed", error=str(exc))
                await asyncio.sleep(1.0)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
