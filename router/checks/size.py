"""Size: an empty or oversize message is rejected before anything parses it."""

from __future__ import annotations

from ledgerbus.router.checks import Check, Inbound, Rejection
from ledgerbus.router.state import RouterState


def make(max_bytes: int) -> Check:
    """A size check with the configured limit (``LEDGERBUS_MAX_MESSAGE_BYTES``)."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        if len(msg.data) > max_bytes:
            return Rejection("too_large", f"message is {len(msg.data)} bytes; the limit is {max_bytes}")
        if not msg.data:
            return Rejection("empty", "message body is empty")
        return None

    return check
