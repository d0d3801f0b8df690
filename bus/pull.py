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
from collections import deque

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
        self._queue: deque[Msg | None] = deque()
        # What pull() waits on while the queue is empty: woken by the next arrival.
        self._waiter: asyncio.Future[None] | None = None
        self._sub: Subscription | None = None
        self.interrupted = False

    async def start(self) -> Puller:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._arrived)
        return self

    async def _arrived(self, msg: Msg) -> None:
        self._put(msg)

    def _put(self, msg: Msg | None) -> None:
        self._queue.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _arrival(self, timeout: float) -> Msg | None:
        """The next message (``None``: interrupted) within ``timeout`` seconds, else
        :class:`TimeoutError`. A future and a timer, not ``wait_for(queue.get())``: the
        arrival wakes the puller in the loop's next turn, where wait_for's task and
        callback took two turns more, on every hop of a lone task."""
        if not self._queue:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._queue:
                raise TimeoutError
        return self._queue.popleft()

    def interrupt(self) -> None:
        """End a pull that is waiting now with what it has, and make every later pull
        return at once with what has already arrived (the owner is stopping)."""
        self.interrupted = True
        self._put(None)

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
        for msg in self._take(len(self._queue)):
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
            if not self._queue:
                try:
                    msg = await self._arrival(max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
            else:
                # What arrived with the first: no timer each (a batch is mostly these).
                msg = self._queue.popleft()
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
        while len(got) < batch and self._queue:
            msg = self._queue.popleft()
            if msg is not None and _status(msg) is None:
                got.append(msg)
        return got


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
