"""bus/publish.py against a real server: each message of a pipelined batch gets its own
outcome, at once for an error (nats-py's publish_async left an error PubAck's future
unresolved), and a PubAck that never comes is a timeout, not a hang."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import nats.errors
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


async def test_a_batch_is_stored_as_nats_py_would_publish_it_one_message_at_a_time(admin: Client,
                                                                                  connect_as: Connect) -> None:
    # bus/publish.py writes a batch's protocol itself (nats-py's publish built each header
    # with a regular expression per key): what JetStream stores must be what nats-py's
    # Client.publish would have sent, header values stripped and CR/LF made spaces.
    router = await connect_as("router")
    js = admin.jetstream()
    publisher = await Publisher(router).start()
    headers = {subjects.HDR_MSG_ID: "id-1", "traceparent": "00-a\r\nPUB work.x 1\r\n-01", " Padded ": "  v ",
               "": "skipped", subjects.HDR_EXPECTED_LAST_SEQ: "0"}
    ours = [("work.publish-check", b'{"n":1}', dict(headers)), ("work.publish-check", b"", None),
            ("work.publish-check", b"x" * 10, {"Only": "one"})]
    acks = await publisher.publish(ours)
    assert all(isinstance(a, PubAck) for a in acks), acks
    for subject, data, hdrs in ours:  # the same through nats-py, into the same stream
        if hdrs is not None and subjects.HDR_MSG_ID in hdrs:  # not a duplicate of ours
            hdrs = {**hdrs, subjects.HDR_MSG_ID: f"{hdrs[subjects.HDR_MSG_ID]}-nats-py"}
            hdrs.pop(subjects.HDR_EXPECTED_LAST_SEQ, None)
        await router.publish(subject, data, headers=hdrs)
    await router.flush()
    stored = [await js.get_msg(subjects.WORK_STREAM, a.seq) for a in acks]
    theirs = [await js.get_msg(subjects.WORK_STREAM, acks[-1].seq + i) for i in range(1, 4)]
    for mine, nats_py in zip(stored, theirs, strict=True):
        assert mine.data == nats_py.data
        expected = dict(nats_py.headers or {})
        if subjects.HDR_MSG_ID in expected:
            expected[subjects.HDR_MSG_ID] = expected[subjects.HDR_MSG_ID].removesuffix("-nats-py")
        got = {k: v for k, v in (mine.headers or {}).items() if k != subjects.HDR_EXPECTED_LAST_SEQ}
        assert got == expected
    assert stored[0].headers is not None and stored[0].headers["traceparent"] == "00-a  PUB work.x 1  -01"
    assert "Padded" in stored[0].headers and "" not in stored[0].headers


async def test_what_nats_py_would_refuse_is_refused_alone_and_a_closed_connection_refuses_the_batch(
        admin: Client, connect_as: Connect) -> None:
    router = await connect_as("router")
    publisher = await Publisher(router).start()
    bad_subject, too_big, bad_key, fine = await publisher.publish([
        ("work.a b", b"{}", None),
        ("work.big", b"x" * (router.max_payload + 1), None),
        ("work.key", b"{}", {"Bad Key": "v"}),
        ("work.fine", b"{}", None),
    ])
    assert isinstance(bad_subject, nats.errors.BadSubjectError)
    assert isinstance(too_big, nats.errors.MaxPayloadError)
    assert isinstance(bad_key, nats.errors.BadHeaderError)
    assert isinstance(fine, PubAck) and fine.stream == subjects.WORK_STREAM
    assert not publisher._waiting
    await router.close()
    outcomes = await publisher.publish([("work.fine", b"{}", None)] * 2, timeout=1)
    assert all(isinstance(o, nats.errors.ConnectionClosedError) for o in outcomes), outcomes
    assert not publisher._waiting
