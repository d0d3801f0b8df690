"""bus/pull.py against a real server: a pull hands over a message as soon as it comes, takes
what is pending at once, skips an old request's status, and keeps an old request's messages.

The waits here are long (seconds) and the checks are "well before the wait ran out": what is
tested is which event ends a pull, not how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from ledgerbus.bus import pull
from tests.support import LoopTurns

STREAM = "PULLTEST"
WAIT = 5.0


@pytest.fixture
async def puller(admin: Client) -> pull.Puller:
    js = admin.jetstream()
    await js.add_stream(name=STREAM, subjects=["q.pulltest.>"])
    config = ConsumerConfig(durable_name="p", ack_policy=AckPolicy.EXPLICIT, ack_wait=60)
    return await pull.durable(admin, js, STREAM, config)


async def publish(nc: Client, *bodies: bytes) -> None:
    js = nc.jetstream()
    for body in bodies:
        await js.publish("q.pulltest.x", body)  # q.> is a subject admin may publish to


async def test_a_lone_message_ends_the_wait(admin: Client, puller: pull.Puller) -> None:
    started = time.monotonic()
    waiting = asyncio.create_task(puller.pull(256, WAIT))
    await asyncio.sleep(0.3)
    await publish(admin, b"lone")
    msgs = await waiting
    assert [m.data for m in msgs] == [b"lone"]
    assert time.monotonic() - started < WAIT / 2, "the pull waited for more than the first message"
    await msgs[0].ack()


async def test_an_arrival_wakes_the_waiting_pull_in_the_next_turn_of_the_loop(admin: Client,
                                                                             puller: pull.Puller) -> None:
    # The router and the agents wait in a pull at every hop of a lone task; with
    # wait_for(queue.get()) the arrival took three turns to reach the puller (the get's task,
    # wait_for's callback, the puller), each an epoll_wait and the loop's Python.
    arrived: list[int] = []
    with LoopTurns() as turns:
        assert puller._sub is not None and puller._sub._cb is not None
        puller._sub._cb = turns.wrap(puller._sub._cb, arrived)  # the subscription's callback
        waiting = asyncio.create_task(puller.pull(256, WAIT))
        await asyncio.sleep(0.3)
        await publish(admin, b"lone")
        msgs = await waiting
        returned = turns.count
    assert [m.data for m in msgs] == [b"lone"]
    assert arrived, "the subscription's callback ran"  # the message, then the request's closing status
    # The pull's task ends in the turn after the arrival; this test, awaiting that task,
    # resumes one turn later (4 turns with wait_for).
    assert returned - arrived[0] <= 2, f"the pull returned {returned - arrived[0]} turns after the arrival"
    await msgs[0].ack()


async def test_a_pull_cancelled_while_it_waits_leaves_its_message_to_the_next_pull(admin: Client, puller: pull.Puller) -> None:
    waiting = asyncio.create_task(puller.pull(256, WAIT))
    await asyncio.sleep(0.3)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await publish(admin, b"after")
    msgs = await puller.pull(256, WAIT)
    assert [m.data for m in msgs] == [b"after"]
    await msgs[0].ack()


async def test_pending_messages_come_at_once_up_to_the_batch(admin: Client, puller: pull.Puller) -> None:
    await publish(admin, *[str(i).encode() for i in range(10)])
    started = time.monotonic()
    first = await puller.pull(4, WAIT)
    rest = await puller.pull(100, WAIT)
    assert [m.data for m in first + rest] == [str(i).encode() for i in range(10)]
    assert time.monotonic() - started < WAIT / 2
    for msg in first + rest:
        assert msg.metadata.num_delivered == 1
        await msg.ack()


async def test_nothing_comes_empty_after_the_wait(puller: pull.Puller) -> None:
    started = time.monotonic()
    assert await puller.pull(256, 0.3) == []
    assert time.monotonic() - started >= 0.25


async def test_an_old_requests_status_is_skipped_and_its_messages_kept(admin: Client, puller: pull.Puller) -> None:
    """What a client leaves behind when it gives up on a request: the request's status, or
    a message it still brings in, arriving during a later pull. nats-py's fetch took such a
    status for its new request's answer, then held the next message for the whole wait."""
    old = f"{puller._prefix}.old"  # a request this puller made earlier and stopped waiting for
    await admin.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.p", json.dumps({"batch": 1, "expires": 300_000_000}).encode(),
                        reply=old)
    started = time.monotonic()
    waiting = asyncio.create_task(puller.pull(256, WAIT))
    await asyncio.sleep(0.6)  # the old request's 408 came while the pull waits
    await publish(admin, b"after")
    msgs = await waiting
    assert [m.data for m in msgs] == [b"after"]
    assert time.monotonic() - started < WAIT / 2

    # An old request that is still open takes the next message; the next pull has it.
    await admin.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.p", json.dumps({"batch": 1, "expires": 10_000_000_000}).encode(),
                        reply=old)
    await asyncio.sleep(0.2)
    await publish(admin, b"to the old request")
    await asyncio.sleep(0.2)
    kept = await puller.pull(256, WAIT)
    assert [m.data for m in kept] == [b"to the old request"]
    await kept[0].ack_sync()
    assert (await admin.jetstream().consumer_info(STREAM, "p")).num_ack_pending == 1  # "after", not acked


async def test_an_interrupt_ends_a_waiting_pull_and_later_pulls_do_not_wait(puller: pull.Puller) -> None:
    started = time.monotonic()
    waiting = asyncio.create_task(puller.pull(256, WAIT))
    await asyncio.sleep(0.3)
    puller.interrupt()
    assert await waiting == []
    assert await puller.pull(256, WAIT) == []
    assert time.monotonic() - started < WAIT / 2, "a pull waited after the interrupt"


async def test_close_hands_back_what_arrived_and_the_open_request_takes_nothing_more(
        admin: Client, puller: pull.Puller) -> None:
    """What a stop leaves: a request still open on the server (its pull was interrupted)
    that then brings a message in. Closing hands that message back (nak), and once closed
    the request takes nothing: the next puller gets both at once, not after AckWait (60 s)."""
    js = admin.jetstream()
    waiting = asyncio.create_task(puller.pull(256, WAIT))
    await asyncio.sleep(0.3)
    puller.interrupt()
    assert await waiting == []
    await publish(admin, b"to the open request")
    await asyncio.sleep(0.3)
    assert (await js.consumer_info(STREAM, "p")).num_ack_pending == 1  # delivered to the request
    await puller.close()
    await publish(admin, b"after the close")
    successor = await pull.Puller(admin, STREAM, "p").start()
    started = time.monotonic()
    got: list = []
    while len(got) < 2 and time.monotonic() - started < WAIT:
        got += await successor.pull(256, WAIT)
    assert sorted((m.data, m.metadata.num_delivered) for m in got) == [
        (b"after the close", 1), (b"to the open request", 2)]
    assert time.monotonic() - started < WAIT / 2
    for msg in got:
        await msg.ack_sync()
    await successor.close()


async def test_interrupt_on_ends_a_waiting_pull_when_any_of_its_events_is_set(puller: pull.Puller) -> None:
    """The router's stop and its lost lease: either ends the fetch."""
    stop, lost = asyncio.Event(), asyncio.Event()
    waker = asyncio.create_task(puller.interrupt_on(stop, lost))
    started = time.monotonic()
    waiting = asyncio.create_task(puller.pull(256, WAIT))
    await asyncio.sleep(0.3)
    lost.set()
    assert await waiting == []
    await waker
    assert time.monotonic() - started < WAIT / 2, "the lost lease did not end the pull"
