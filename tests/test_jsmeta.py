"""bus/jsmeta reads a delivery's position as nats-py's ``Msg.metadata`` does, only faster."""

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from ledgerbus.bus.jsmeta import ack_meta

REPLIES = [
    "$JS.ACK.INGRESS.router.2.1734.1733.1764850000123456789.17",
    "$JS.ACK._.ACCHASH.AUDIT.projector.1.99.98.1764850000987654321.0",
    "$JS.ACK.hub.ACCHASH.WORK.work-echo.3.5.4.1764850001000000001.250.x7Rk",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_the_numbers_are_those_nats_py_reads(reply: str) -> None:
    msg = Msg(None, subject="s", reply=reply)  # type: ignore[arg-type]
    meta, theirs = ack_meta(msg), msg.metadata
    assert (meta.stream_seq, meta.delivered, meta.pending) == (
        theirs.sequence.stream, theirs.num_delivered, theirs.num_pending)
    assert abs(meta.stored_s - theirs.timestamp.timestamp()) < 1e-6


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.1", "$JS.ACK.S.c.1.2.3", "$JS.ACK.S.c.x.2.3.4.5",
                                   "$JS.NAK.S.c.1.2.3.4.5"])
def test_anything_else_is_not_a_jetstream_delivery(reply: str) -> None:
    with pytest.raises(NotJSMessageError):
        ack_meta(Msg(None, subject="s", reply=reply))  # type: ignore[arg-type]
