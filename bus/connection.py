"""Connecting to NATS with a process's credentials, retrying while the server comes up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from bus.errors import BusError
from bus.settings import Settings

log = structlog.get_logger(__name__)


class ConnectionEvents:
    """Collects what the server said asynchronously, so a timeout can say why.

    NATS reports a permissions violation as an asynchronous error, and the request that
    caused it just times out; remembering the violation turns that into a clear error.
    """

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.closing = False

    async def on_error(self, exc: Exception) -> None:
        """nats.py ``error_cb``: one log line, no traceback."""
        text = str(exc) or type(exc).__name__
        if "permissions violation" in text:
            self.violations.append(text)
            log.error("nats_permission_violation", error=text)
        else:
            log.warning("nats_error", error=text)

    async def on_disconnect(self) -> None:
        """nats.py ``disconnected_cb`` (quiet when we are the ones closing)."""
        if not self.closing:
            log.warning("nats_disconnected")

    async def on_reconnect(self) -> None:
        """nats.py ``reconnected_cb``."""
        log.info("nats_reconnected")


async def _connect_once(settings: Settings, role: str, name: str, events: ConnectionEvents) -> Client:
    user, password = settings.credentials(role)
    return await nats.connect(
        servers=settings.servers,
        user=user,
        password=password,
        name=name,
        connect_timeout=2,
        drain_timeout=5,
        # Once connected, ride out server restarts rather than dying.
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        error_cb=events.on_error,
        disconnected_cb=events.on_disconnect,
        reconnected_cb=events.on_reconnect,
    )


async def connect(
    settings: Settings, role: str, name: str | None = None, events: ConnectionEvents | None = None
) -> Client:
    """Connect as ``role``; retry for ``connect_timeout_s`` so processes may start before nats.

    Authorization failures are not retried: they will not get better by waiting.
    """
    events = events or ConnectionEvents()
    deadline = asyncio.get_running_loop().time() + settings.connect_timeout_s
    delay = 0.1
    while True:
        try:
            return await _connect_once(settings, role, name or f"ledgerbus-{role}", events)
        except nats.errors.Error as exc:
            if "authorization" in str(exc).lower():
                raise BusError(f"NATS refused the credentials of user {settings.credentials(role)[0]!r}") from exc
            last: Exception = exc
        except OSError as exc:
            last = exc
        if asyncio.get_running_loop().time() >= deadline:
            raise BusError(f"cannot connect to {settings.url}: {last}") from last
        log.info("nats_connect_retry", url=settings.url, error=str(last))
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


@asynccontextmanager
async def connected(settings: Settings, role: str, name: str | None = None) -> AsyncIterator[Client]:
    """``async with connected(settings, "router") as nc:`` - drains the connection on exit.

    A timeout that follows a permissions violation is raised as a :class:`BusError`
    naming the violation.
    """
    events = ConnectionEvents()
    nc = await connect(settings, role, name, events)
    try:
        yield nc
    except TimeoutError as exc:
        if events.violations:
            raise BusError(f"NATS refused {settings.credentials(role)[0]!r}: {events.violations[-1]}") from exc
        raise
    finally:
        events.closing = True
        if not nc.is_closed:
            try:
                await nc.drain()
            except (nats.errors.Error, asyncio.TimeoutError):
                await nc.close()
