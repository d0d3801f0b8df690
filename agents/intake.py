"""An agent's intake: how work comes in, and how many items run at once.

One long poll per skill on that skill's WORK consumer (``bus/pull.py``), the agent's
slots (its concurrency) shared by every skill, the running items, and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from ledgerbus.bus import failpoints
from ledgerbus.bus.jsmeta import ack_meta
from ledgerbus.bus.pull import Puller

FETCH_MAX = 64
"""Most work items one pull request asks for."""
POLL_S = 1.0
"""How long one request for a skill's next work item waits on the server (a long poll)."""
BATCH_WAIT_S = 0.005
"""How long a batch request right after an item waits when nothing more is queued."""
LONE_ITEM_S = 0.005
"""How long the next long poll waits for a lone item (nothing queued behind it) to end."""


def nothing_behind(msg: Msg) -> bool:
    """Whether JetStream had nothing more for this consumer when it delivered ``msg``
    (the delivery's pending count)."""
    try:
        return ack_meta(msg).pending == 0
    except NotJSMessageError:
        return False


class KeepAlive:
    """Tells JetStream, until cancelled, that an item is still held: ``in_progress`` every
    AckWait/3, well inside AckWait. A timer, not a task: most items are settled before the
    first is due, and then cost nothing more."""

    def __init__(self, msg: Msg, ack_wait_s: float, log: Any) -> None:
        self._msg, self._log = msg, log
        self._interval = max(ack_wait_s / 3, 0.1)
        self._loop = asyncio.get_running_loop()
        self._sending: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(self._interval, self._beat)

    def _beat(self) -> None:
        if failpoints.disabled("agent.keepalive"):
            self._timer = None
            return
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send())
        self._timer = self._loop.call_later(self._interval, self._beat)

    async def _send(self) -> None:
        try:
            await self._msg.in_progress()
        except nats.errors.Error as exc:
            self._log.warning("in_progress_failed", error=str(exc))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sending is not None:
            self._sending.cancel()


class Intake:
    """Pulls each skill's work and runs it with ``run(skill, msg)``, at most ``concurrency``
    items at once; ``keep(msg)`` keeps an item alive while it waits for a slot."""

    def __init__(self, concurrency: int, skills: int, run: Callable[[str, Msg], Coroutine[Any, Any, None]],
                 keep: Callable[[Msg], KeepAlive], log: Any) -> None:
        self._share = max(1, min(FETCH_MAX, concurrency // skills))
        self._slots = asyncio.Semaphore(concurrency)
        self._run, self._keep, self._log = run, keep, log
        self.running: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self._pullers: list[Puller] = []

    async def pull(self, skill: str, puller: Puller) -> None:
        """Take this skill's work until draining: one item as soon as it is there, then in
        one request whatever else is already waiting, up to the free slots.

        The long poll waits for a free slot but does not hold one: every skill's poll is
        out at once however few slots the agent has. (Holding a slot through an idle poll
        made a one-slot agent with two skills serve each skill half the time: a task for
        the other waited up to the whole poll, ``POLL_S``.) So when polls of several skills
        bring an item at the same moment for the last slot, the later ones wait for a slot,
        kept alive: at most one item per other skill, never run beyond the concurrency.
        Right after an item, a batch request asks for as many as there are free slots (up
        to this skill's share of the concurrency), answered at once from what is queued, or
        within ``BATCH_WAIT_S`` when nothing is; those slots are held before it asks, and
        given back for items that did not come. An item whose delivery says nothing was
        queued behind it (a lone task) gets no batch request: the request and its empty
        answer, ``BATCH_WAIT_S`` later, were one more request for the server and one more
        wake-up for the agent per lone task, the answer mostly landing in the next task.
        Its next long poll waits for it to end, ``LONE_ITEM_S`` at most: sent at once, the
        request woke nats-server while the item ran and its report was stored, on the
        task's own path (p50 of a lone task 0.14-0.20 ms lower in paired runs); a longer
        item has the poll out again after ``LONE_ITEM_S``, so a task arriving meanwhile
        waits that long at most.
        """
        self._pullers.append(puller)
        while await self._slot_free():
            first = await self._fetch(skill, puller, 1, POLL_S)
            if not first or not await self._take_slot(first[0]):
                continue
            running = self._start(skill, first[0])
            if nothing_behind(first[0]):
                # A batch request would only wait BATCH_WAIT_S, then end empty; the long
                # poll waits for the item a moment, off its path.
                await asyncio.wait({running}, timeout=LONE_ITEM_S)
                continue
            taken = 0
            while taken < self._share - 1 and not self._slots.locked():
                await self._slots.acquire()  # free: does not wait
                taken += 1
            if taken:
                more = await self._fetch(skill, puller, taken, BATCH_WAIT_S)
                for _ in range(taken - len(more)):
                    self._slots.release()
                for msg in more:
                    self._start(skill, msg)

    async def drain(self, pullers: list[asyncio.Task[None]], timeout: float) -> None:
        """Stop pulling (a poll waiting now ends at once), give the running items
        ``timeout``, then cancel what still runs (it hands its item back)."""
        self.stopping.set()
        for puller in self._pullers:
            puller.interrupt()
        await asyncio.gather(*pullers, return_exceptions=True)
        if self.running:
            self._log.info("agent_draining", running=len(self.running))
            _, still = await asyncio.wait(set(self.running), timeout=timeout)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    async def _slot_free(self) -> bool:
        """Until a slot is free, without taking it; ``False`` once the agent drains (a
        drain must not wait for a running item to end before its timeout starts)."""
        if self._slots.locked():
            free = asyncio.create_task(self._free())
            try:
                await self._unless_stopping(free)
            finally:
                free.cancel()
        return not self.stopping.is_set()

    async def _free(self) -> None:
        async with self._slots:
            pass

    async def _unless_stopping(self, work: asyncio.Task[Any]) -> None:
        """Until ``work`` is done or the agent drains, whichever comes first."""
        stopping = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()

    async def _take_slot(self, msg: Msg) -> bool:
        """A slot for an item the long poll brought: at once if one is free, else when one
        frees (the item kept alive meanwhile); ``False`` (the item handed back) if the
        agent starts draining first."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        keep = self._keep(msg)
        acquire = asyncio.create_task(self._slots.acquire())
        try:
            await self._unless_stopping(acquire)
        finally:
            keep.cancel()
            if not acquire.done():
                acquire.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
        acquired = acquire.done() and not acquire.cancelled()
        if acquired and not self.stopping.is_set():
            return True
        if acquired:
            self._slots.release()
        with contextlib.suppress(nats.errors.Error):
            await msg.nak()
        return False

    async def _fetch(self, skill: str, puller: Puller, n: int, wait: float) -> list[Msg]:
        """Up to ``n`` work items within ``wait`` seconds; none when the pull failed."""
        try:
            return await puller.pull(n, wait)
        except nats.errors.Error as exc:
            self._log.warning("work_fetch_failed", skill=skill, error=str(exc))
            await asyncio.sleep(0.5)
            return []

    def _start(self, skill: str, msg: Msg) -> asyncio.Task[None]:
        """Run one work item in the slot held for it (given back when it ends)."""
        task = asyncio.create_task(self._run(skill, msg))
        self.running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self._slots.release()
