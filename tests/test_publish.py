"""bus/publish.py against a real server: each message of a pipelined batch gets its own
outcome, at once for an error (nats-py's publish_async left an error PubAck's future
unresolved), and a PubAck that never comes is a timeout, not a hang."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import PubAck

from ledgerbus.bus import subjects
from ledgerbus.bus.publish import Publisher
from tests.support import LoopTurns

Connect = Callable[[str], Awaitable[Client]]


async def test_each_message_of_a_batch_gets_its_own_outcome(admin: Client, connect_as: Connect) -> None:
    router = await connect_as("router")
    listener = await connect_as("agent-echo-1")
    silent = await listener.subscribe("notify.agent.echo-1.silent")  # never answers
    await listener.flush()  # the server knows the subscription before the publish (else: no responders)
    publisher = await Publisher(router).start()
    seq = (await admin.jetstream().stream_info(subjects.AUDIT_STREAM)).state.last_seq
    started = time.monotonic()
    stored, wrong_seq, no_stream, stored_too, no_answer = await publisher.publish([
        ("audit.accepted.test.a", b"{}", {subjects.HDR_EXPECTED_LAST_SEQ: str(seq)}),
        ("audit.accepted.test.b", b"{}", {subjects.HDR_EXPECTED_LAST_SEQ: str(seq + 99)}),
        ("notify.agent.nobody.x", b"{}", None),
        ("audit.accepted.test.c", b"{}", None),
        ("notify.agent.echo-1.silent", b"{}", None),
    ], timeout=1.0)
    assert isinstance(stored, PubAck) and stored.seq == seq + 1 and stored.stream == subjects.AUDIT_STREAM
    assert isinstance(wrong_seq, nats.js.errors.APIError) and wrong_seq.err_code == 10071, wrong_seq
    assert isinstance(no_stream, nats.js.errors.NoStreamResponseError)
    assert isinstance(stored_too, PubAck) and stored_too.seq == seq + 2
    assert isinstance(no_answer, TimeoutError)
    assert time.monotonic() - started >= 0.9
    assert (await silent.next_msg(timeout=1)).data == b"{}"
    assert not publisher._waiting, "a timed-out batch leaves nothing behind (a late reply is dropped)"

    # Without a message that goes unanswered, the batch ends with its last PubAck.
    started = time.monotonic()
    (ack,) = await publisher.publish([("audit.accepted.test.d", b"{}", None)], timeout=30)
    assert isinstance(ack, PubAck) and ack.seq == seq + 3
    assert time.monotonic() - started < 15
    assert await publisher.publish([]) == []


async def test_the_last_puback_wakes_the_publisher_in_the_next_turn_of_the_loop(admin: Client,
                                                                              connect_as: Connect) -> None:
    # Each hop of a lone task waits for a PubAck; wait_for(shield(...)) took three turns
    # from the reply to the publisher (shield's callback, wait_for's, the task).
    router = await connect_as("router")
    publisher = Publisher(router)
    replied: list[int] = []
    with LoopTurns() as turns:
        publisher._replied = turns.wrap(publisher._replied, replied)  # type: ignore[method-assign,assignment]
        await publisher.start()
        (ack,) = await publisher.publish([("audit.accepted.test.turns", b"{}", None)], timeout=30)
        returned = turns.count
    assert isinstance(ack, PubAck) and len(replied) == 1
    assert returned - replied[0] <= 1, f"publish returned {returned - replied[0]} turns after its PubAck"
