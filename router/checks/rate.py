"""Rate: a token bucket per principal on task submissions and memory writes, as policy sets it.

The clock is the time JetStream stored the message in INGRESS, not the time the router
happens to read it: a backlog drained after a router restart is not mistaken for a burst.
Results and progress are never rate limited: dropping a claimant's report would leave its
task running for ever.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledgerbus.bus.events import (
    CheckpointSaved,
    MemoryWritten,
    PlanSubmitted,
    SharedWritten,
    TaskCancelled,
    TaskSubmitted,
)
from ledgerbus.router.checks import Check, Inbound, Rejection
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState


@dataclass(slots=True)
class Bucket:
    """Tokens left and when they were last counted (seconds, INGRESS clock)."""

    tokens: float
    at: float


RATED = (TaskSubmitted, PlanSubmitted, TaskCancelled, MemoryWritten, SharedWritten, CheckpointSaved)
"""What a principal may flood the bus with: new work and new memory."""


def make(policy: PolicyFile) -> Check:
    """A rate check with its own buckets, keyed by principal."""
    buckets: dict[str, Bucket] = {}

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        if not isinstance(msg.event, RATED):
            return None
        found = policy.current().rate_limit(msg.principal_token)
        if found is None:
            return None
        pattern, limit = found
        now = msg.received_at
        bucket = buckets.setdefault(msg.principal_token, Bucket(float(limit.burst), now))
        bucket.tokens = min(float(limit.burst), bucket.tokens + max(0.0, now - bucket.at) * limit.rate)
        bucket.at = max(bucket.at, now)
        if bucket.tokens < 1.0:
            return Rejection(
                "rate_limited",
                f"{msg.principal_token} is over its limit ({limit.rate:g}/s, burst {limit.burst}, policy {pattern!r})",
            )
        bucket.tokens -= 1.0
        return None

    return check
