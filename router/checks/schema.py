"""Schema: the body must strictly decode as a member of the ingress union, and name no
key twice in any object (see :mod:`bus.jsonkeys`)."""

from __future__ import annotations

from ledgerbus.bus import codec, jsonkeys
from ledgerbus.bus.errors import SchemaError
from ledgerbus.router.checks import Inbound, Learned, Rejection, learned, secrets
from ledgerbus.router.state import RouterState


def check(msg: Inbound, state: RouterState) -> Rejection | Learned:
    """Decode the body; on failure the reason names the offending path.

    The duplicate-key scan runs only on a body that decoded, so it sees well-formed JSON
    and invalid UTF-8 or JSON keep their ``schema`` rejection. A body with a duplicate
    is refused before the event is learned: its record then keeps an excerpt of the
    bytes as sent, not msgspec's last-key-wins reading of them.
    """
    try:
        event = codec.decode_event(msg.data)
    except SchemaError as exc:
        return Rejection("schema", str(exc))
    path = jsonkeys.duplicate_key(msg.data)
    if path is not None:
        # The path quotes the sender's key: redact it like every other text we record.
        reason, _ = secrets.redact(f"duplicate key at {path}: an object may name a key only once")
        return Rejection("invalid_json", reason)
    return learned(event=event)
