"""Connecting to NATS with a process's credentials, retrying while the server comes up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats.aio.client
import nats.errors
import structlog

from ledgerbus.bus.cancel import stop_task
from ledgerbus.bus.errors import BusError, ConfigError
from ledgerbus.bus.home import outside_hint
from ledgerbus.bus.identity import Credentials, wait_for_credentials
from ledgerbus.bus.settings import Settings

log = structlog.get_logger(__name__)


PUBACK_TIMEOUT_S = 10.0
"""How long a pipelined publish waits for its PubAck (the JetStream API timeout the
processes use; ``bus/publish.py``): the ack of a message whose server died before
answering (kill -9, a cluster node lost with a stream leader) never comes."""


class Client(nats.aio.client.Client):
    """nats-py's client, with a :meth:`flush` that keeps its word.

    nats-py (2.16, and its main branch of 2026-06) writes a flush's PING straight to the
    socket, ahead of the commands its flusher task has not written yet (``_send_ping``);
    so the PONG can come back before the server has the UNSUB or PUB sent just before.
    ``Subscription.drain`` is one such case: it takes the PONG to mean that nothing more
    will come and drops the subscription, while the server still delivers to it. A pull
    request left open by a stopped puller took the next message that way, and it came back
    only after AckWait (1 stop in 10; ``tests/test_connection.py`` shows it at the core).
    Here the queued commands are written first, as nats-py's own flusher would.
    """

    async def flush(self, timeout: int = nats.aio.client.DEFAULT_FLUSH_TIMEOUT) -> None:
        flusher = self._flusher_task
        if self.is_connected and self._pending_data_size and flusher is not None and not flusher.done():
            written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # The flusher writes all that is pending, then resolves the futures it takes.
            await self._flush_queue.put(written)  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(written, timeout)
            except TimeoutError:
                raise nats.errors.FlushTimeoutError from None
        await super().flush(timeout)


class ConnectionEvents:
    """Collects what the server said asynchronously, so a failure can say why.

    NATS reports a permissions violation as an asynchronous error, and the request that
    caused it just times out; remembering the violation turns that into a clear error.
    Before the first connection, errors are only remembered (the connect call reports
    them); afterwards each one is logged once.
    """

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.last_error = ""
        self.refused = asyncio.Event()
        self.connected = False
        self.closing = False

    async def on_error(self, exc: Exception) -> None:
        """nats.py ``error_cb``: one log line, no traceback."""
        text = str(exc) or type(exc).__name__
        self.last_error = text
        if "authorization" in text.lower():
            self.refused.set()
        if "permissions violation" in text:
            self.violations.append(text)
            log.error("nats_permission_violation", error=text)
        elif self.connected:
            log.warning("nats_error", error=text)
        else:
            log.debug("nats_connect_failed", error=text)

    async def on_disconnect(self) -> None:
        """nats.py ``disconnected_cb`` (quiet when we are the ones closing)."""
        if self.connected and not self.closing:
            log.warning("nats_disconnected")

    async def on_reconnect(self) -> None:
        """nats.py ``reconnected_cb``."""
        log.info("nats_reconnected")


async def credentials(settings: Settings, principal: str) -> Credentials:
    """``LEDGERBUS_USER``/``LEDGERBUS_PASSWORD`` if set, else the principal's credentials file."""
    if settings.user:
        return Credentials(settings.user, settings.password or "", f"_INBOX_{settings.user}")
    try:
        return await wait_for_credentials(settings.auth_dir, principal, settings.connect_timeout_s)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{outside_hint(settings.home)}") from exc


async def connect(
    settings: Settings, principal: str, client_name: str | None = None, events: ConnectionEvents | None = None
) -> Client:
    """Connect as ``principal`` (``router``, ``agent-echo-1``...), retrying for
    ``connect_timeout_s`` so processes may start before nats.

    Once connected, the client reconnects for ever (a restarted server is ridden out).
    Refused credentials fail at once: they will not get better by waiting.
    """
    events = events or ConnectionEvents()
    creds = await credentials(settings, principal)
    user = creds.user
    nc = Client()
    # nats.py retries the first connection too, for as long as reconnects are allowed:
    # race it against our deadline and against a refusal.
    connecting = asyncio.ensure_future(
        nc.connect(
            servers=settings.servers,
            user=creds.user,
            password=creds.password,
            inbox_prefix=creds.inbox_prefix,
            name=client_name or f"ledgerbus-{principal}",
            connect_timeout=2,
            drain_timeout=5,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # annotated int, used as seconds
            allow_reconnect=True,
            error_cb=events.on_error,
            disconnected_cb=events.on_disconnect,
            reconnected_cb=events.on_reconnect,
        )
    )
    refused = asyncio.ensure_future(events.refused.wait())
    done, _ = await asyncio.wait(
        {connecting, refused}, timeout=settings.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    refused.cancel()
    if connecting in done and connecting.exception() is None:
        events.connected = True
        return nc
    # For sure: its retries wait with wait_for, which can drop one cancel (bus/cancel.py),
    # and they go on for ever.
    await stop_task(connecting)
    await nc.close()
    if events.refused.is_set():
        raise BusError(f"NATS refused the credentials of user {user!r}")
    reason = events.last_error or (str(connecting.exception()) if connecting in done else "no answer")
    raise BusError(f"cannot connect to {settings.url} within {settings.connect_timeout_s:g}s: {reason}")


@asynccontextmanager
async def connected(settings: Settings, principal: str, client_name: str | None = None) -> AsyncIterator[Client]:
    """``async with connected(settings, "router") as nc:`` - drains the connection on exit.

    A timeout that follows a permissions violation is raised as a :class:`BusError`
    naming the violation.
    """
    events = ConnectionEvents()
    nc = await connect(settings, principal, client_name, events)
    try:
        yield nc
    except TimeoutError as exc:
        if events.violations:
            raise BusError(f"NATS refused {principal}: {events.violations[-1]}") from exc
        raise
    finally:
        events.closing = True
        if not nc.is_closed:
            try:
                await nc.drain()
            except (nats.errors.Error, TimeoutError, OSError):
                with contextlib.suppress(nats.errors.Error, OSError):  # the server is gone: nothing to close
                    await nc.close()


def cancel_requested() -> bool:
    """Whether the running task has been asked to stop. A background loop around nats.py
    calls checks this each turn: a cancellation that lands inside nats.py can come out as
    its TimeoutError (or another error), which such a loop would take as "try again" and so
    never stop, holding up whoever awaits it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
