"""Asking the projector: request/reply on ``q.<projection>.<op>``, from any process.

Replies are ``{"ok": true, "position": N, "data": ...}`` or ``{"ok": false, "error": ...}``
(with ``"code": "not_found"`` when the projection has no such thing);
:func:`ask` returns the data or raises :class:`QueryError` (:class:`NotFound` when the
projection has no such thing).
"""

from __future__ import annotations

import json
from typing import Any

import nats.errors
from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.errors import NotFound, QueryError


async def ask(nc: Client, projection: str, op: str, request: dict[str, Any], timeout: float = 5.0,
              tries: int = 2) -> Any:
    """Ask one query of any projector in the queue group and return its data.

    A request that reaches a projector as it dies dies with it: for a moment after a
    projector is killed, nats-server still routes to its member of the queue group. So a
    query that gets no answer in ``timeout`` is asked again, up to ``tries`` times, of
    whichever projectors are left (queries only read: asking twice is harmless).
    """
    if tries < 1:
        raise ValueError(f"tries={tries}: a query is asked at least once")
    subject = subjects.query(projection, op)
    for attempt in range(1, tries + 1):
        try:
            msg = await nc.request(subject, codec.encode(request), timeout=timeout)
            break
        except nats.errors.NoRespondersError as exc:
            raise QueryError(f"no projector answers {subject}: start `agentctl projector`, or use --db PATH") from exc
        except TimeoutError as exc:
            if attempt == tries:
                raise QueryError(f"the projector did not answer {subject} in {timeout:g}s"
                                 f" ({tries} tries)") from exc
    return unwrap(json.loads(msg.data))


def unwrap(reply: dict[str, Any]) -> Any:
    """The data of a reply, or the error it carries."""
    if not reply.get("ok"):
        error = reply.get("error", "the projector refused the query")
        if reply.get("code") == "not_found":
            raise NotFound(error, reply.get("position"))
        raise QueryError(error)
    return reply["data"]
