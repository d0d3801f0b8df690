"""Duplicate: a message id is accepted once, also beyond JetStream's de-duplication window.

JetStream drops a repeated ``Nats-Msg-Id`` on INGRESS within its window (the publisher
gets a PubAck marked duplicate and nothing reaches the router). After the window the
router remembers the ids it saw, for ``dedup_horizon_s`` and at most ``dedup_max_ids`` of them (the
oldest forgotten first), from the log itself.
"""

from __future__ import annotations

from ledgerbus.router.checks import Inbound, Rejection
from ledgerbus.router.state import RouterState


def check(msg: Inbound, state: RouterState) -> Rejection | None:
    """Reject an event whose id the log already has."""
    assert msg.event is not None
    seen = state.seen.message(msg.event.id)
    if seen is not None:
        return Rejection("duplicate_message", f"message id {msg.event.id} was already recorded at seq {seen}")
    return None
