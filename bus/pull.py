"""Pull a batch from a JetStream consumer: what is there at once, or the first to come.

Why not nats-py's ``PullSubscription.fetch(n, timeout)``: it asks first with ``no_wait`` and
``expires`` (the server waits for a first message, then hands over what is pending and ends
the request with a status), and takes the first status it reads as that request's end. A
status can be left over from the previous request, which the client gave up on a moment
before the server expired it. ``fetch`` then sends a second request for ``n`` messages
*without* ``no_wait``, and once one message has come it waits for the other ``n - 1`` until
the timeout. Measured in the router (``fetch(256, timeout=1.0)`` on INGRESS): 3 of 10 lone
tasks sent after a quiet moment waited 0.4-0.9 s for the router to see their result.

Here every request has its own reply subject under one subscription, so a status is known
to be this request's or an old one's (which is skipped), and messages an old request still
brings in are kept for the caller (they are deliveries like any other: to ack, nak or term).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, Header, StatusCode

_GRACE_S = 0.5
"""How long past its ``expires`` a request's closing status may take before the caller
gets what came (a reconnect can lose the status; the messages are not lost: unacked, they
come back after AckWait)."""


class Puller:
    """One pull consumer, pulled from by one task at a time."""

    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._prefix = nc.new_inbox()
        self._ids = itertools.count()
        # None: interrupt()'s wake-up, not a delivery.
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._sub: Subscription | None = None
        self.interrupted = False

    async def start(self) -> Puller:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._arrived)
        return self

    async def _arrived(self, msg: Msg) -> None:
        self._queue.put_nowait(msg)

    def interrupt(self) -> None:
        """End a pull that is waiting now with what it has, and make every later pull
        return at once with what has already arrived (the owner is stopping)."""
        self.interrupted = True
        self._queue.put_nowait(None)

    async def interrupt_on(self, *events: asyncio.Event) -> None:
        """:meth:`interrupt` once any of ``events`` is set (run it as a task; cancel it
        when the pulling is over)."""
        waits = [asyncio.create_task(event.wait()) for event in events]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self.interrupt()

    async def close(self) -> None:
        """Stop receiving, and hand back (nak) what arrived and was not pulled.

        The subscription is drained, not dropped: once the server has our unsubscribe, it
        drops a request still open (it delivers only to a reply subject with interest), and
        what it delivered before that has arrived by the flush's reply (a reply that comes
        after the unsubscribe only with ``bus.connection.Client``'s flush). Naked, those come
        back at once to whoever pulls next, not after AckWait; so a stop need not wait out
        an open request's ``expires``.
        """
        self.interrupt()
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        try:
            await sub.drain()
        except nats.errors.Error:
            # The connection is closing: nothing more arrives, and a nak could not be sent.
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            return
        for msg in self._take(self._queue.qsize()):
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()

    async def pull(self, batch: int, wait: float) -> list[Msg]:
        """Up to ``batch`` messages: those pending now, or, when none are, the first to
        arrive within ``wait`` seconds with whatever is pending by then; ``[]`` if none.
        Once :meth:`interrupt` is called, only what has already arrived.

        Raises :class:`nats.js.errors.APIError` when the server ends the request with an
        error (the consumer was deleted, too many waiting requests).
        """
        got = self._take(batch)
        if self.interrupted:
            return got
        request: dict[str, int | bool] = {"batch": batch - len(got), "no_wait": True}
        if not got:
            # With expires the server waits for a first message, then answers no_wait.
            request["expires"] = max(1, int(wait * 1e9))
        elif len(got) == batch:
            return got
        reply = f"{self._prefix}.{next(self._ids)}"
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=reply)
        deadline = time.monotonic() + (wait if not got else 0.0) + _GRACE_S
        while len(got) < batch:
            if self._queue.empty():
                try:
                    # asyncio.timeout, not wait_for: the get runs in this task, so an
                    # arrival wakes the puller in the loop's next turn, where wait_for's
                    # task and callback took two turns more, on every hop of a lone task.
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        msg = await self._queue.get()
                except TimeoutError:
                    break
            else:
                # What arrived with the first: no timer and no task each (a batch is
                # mostly these).
                msg = self._queue.get_nowait()
            if msg is None:
                break  # interrupted
            status = _status(msg)
            if status is None:
                got.append(msg)
            elif msg.subject == reply and status != StatusCode.CONTROL_MESSAGE:
                if status not in (StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT):
                    if got:
                        # Hand over what came; the error shows again on the next request.
                        break
                    raise nats.js.errors.APIError.from_msg(msg)
                break  # this request is over
        return got

    def _take(self, batch: int) -> list[Msg]:
        """Messages already received (old requests' late deliveries), old statuses and
        wake-ups dropped."""
        got: list[Msg] = []
        while len(got) < batch and not self._queue.empty():
            msg = self._queue.get_nowait()
            if msg is not None and _status(msg) is None:
                got.append(msg)
        return got


def _status(msg: Msg) -> str | None:
    return msg.headers.get(Header.STATUS) if msg.headers else None


async def durable(nc: Client, js: JetStreamContext, stream: str, config: ConsumerConfig) -> Puller:
    """A puller on the durable consumer ``config`` names, made with ``config`` when it does
    not exist yet (as ``pull_subscribe`` does: an existing consumer is used as it is)."""
    assert config.durable_name is not None
    try:
        await js.consumer_info(stream, config.durable_name)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(stream, config=config)
    return await Puller(nc, stream, config.durable_name).start()
