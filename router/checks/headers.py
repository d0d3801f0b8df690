"""Headers: clients may not set JetStream control headers; only the router sets those.

JetStream itself acts on some ``Nats-*`` headers at publish time (rollup, TTL, expected
sequences, schedules, batches). INGRESS refuses most of them by configuration; whatever
reaches the router with a control header is rejected here, so nothing a client sets can
steer how the router's own writes are stored.
"""

from __future__ import annotations

from ledgerbus.bus import subjects
from ledgerbus.router.checks import Inbound, Rejection
from ledgerbus.router.state import RouterState

ALLOWED = frozenset(
    h.lower() for h in (subjects.HDR_MSG_ID, subjects.HDR_TRACEPARENT, subjects.HDR_TRACESTATE, "baggage")
)


def check(msg: Inbound, state: RouterState) -> Rejection | None:
    """Reject any ``Nats-*`` header but ``Nats-Msg-Id``."""
    forbidden = sorted(h for h in msg.headers if h.lower().startswith("nats-") and h.lower() not in ALLOWED)
    if forbidden:
        return Rejection("forbidden_header", f"clients may not set {', '.join(forbidden)}")
    return None
