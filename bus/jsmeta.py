"""A JetStream delivery's position, read from its reply subject in about a microsecond.

nats-py's ``Msg.metadata`` parses the same subject into two frozen dataclasses and a
``datetime``: about 8 µs, and the task path reads it five times per task (the router
twice, the agent once, the projector twice). This reads only the numbers.

The subject is ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.
<stored ns>.<pending>`` (9 tokens), or with ``<domain>.<account hash>`` after ``$JS.ACK``
and sometimes a random token last (11 or more): the forms nats-py accepts.
"""

from __future__ import annotations

from typing import NamedTuple

from nats.aio.msg import Msg
from nats.errors import NotJSMessageError


class AckMeta(NamedTuple):
    stream_seq: int
    """The message's sequence in its stream."""
    delivered: int
    """How many times the consumer delivered it (1 the first time)."""
    stored_ns: int
    """When the stream stored it (POSIX nanoseconds)."""
    pending: int
    """How many more the consumer has to deliver after it."""

    @property
    def stored_s(self) -> float:
        return self.stored_ns / 1e9


def ack_meta(msg: Msg) -> AckMeta:
    """The position of a JetStream delivery; :class:`NotJSMessageError` for anything else."""
    tokens = (msg.reply or "").split(".")
    count = len(tokens)
    if count == 9:
        base = 4
    elif count >= 11:
        base = 6
    else:
        raise NotJSMessageError
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        raise NotJSMessageError
    try:
        return AckMeta(int(tokens[base + 1]), int(tokens[base]), int(tokens[base + 3]), int(tokens[base + 4]))
    except ValueError:
        raise NotJSMessageError from None
