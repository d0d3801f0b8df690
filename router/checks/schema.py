"""Schema: the body must strictly decode as a member of the ingress union."""

from __future__ import annotations

from bus import codec
from bus.errors import SchemaError
from router.checks import Inbound, Rejection
from router.state import RouterState


def check(msg: Inbound, state: RouterState) -> Rejection | None:
    """Decode the body; on failure the reason names the offending path."""
    try:
        msg.event = codec.decode_event(msg.data)
    except SchemaError as exc:
        return Rejection("schema", str(exc))
    return None
