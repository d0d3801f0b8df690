"""Checks that a router snapshot plus the log after it folds to exactly the state a fold
of the whole log gives: used by tests/test_snapshots.py and at the end of the end-to-end
tests whose logs hold plans, retries, approvals, cancellations, memory checkpoints and
handoffs (each calls :func:`assert_snapshots_fold_alike` once its writers have stopped)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from ledgerbus.bus import anchor, chain, subjects
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.settings import Settings
from ledgerbus.router import audit
from ledgerbus.router.seen import Seen
from ledgerbus.router.snapshots import Snapshots, encode_state, seal
from ledgerbus.router.state import RouterState

SCHEDULER_OWNED = frozenset({"dirty", "held", "ready_since", "orphaned", "_traceparent"})
"""What the scheduler keeps in the state at run time (router/snapshots.py says why a
snapshot leaves them out); every other attribute is compared."""


def canonical(state: RouterState) -> dict[str, Any]:
    """Every attribute of the state but the scheduler's, as plain data: insertion order
    kept where it matters (tasks, the de-duplication structures), sets sorted."""
    out: dict[str, Any] = {}
    for name, value in sorted(vars(state).items()):
        if name in SCHEDULER_OWNED:
            continue
        if name == "tasks":
            value = [(task_id, type(task).__name__, task) for task_id, task in value.items()]
        elif name == "_timers":
            value = sorted(value)
        elif isinstance(value, OrderedDict):
            value = list(value.items())
        elif isinstance(value, Seen):  # the audited messages and ids, in order, and its bounds
            value = {k: list(v.items()) if isinstance(v, OrderedDict) else v for k, v in sorted(vars(value).items())}
        out[name] = msgspec.to_builtins(value, order="deterministic")
    return out


async def fold_until(js: JetStreamContext, until: int, dedup_horizon_s: float) -> tuple[RouterState, ChainHead]:
    """The state after folding records 1..``until`` as the router does (headers included)."""
    state = RouterState(dedup_horizon_s=dedup_horizon_s)
    head = ChainHead()
    sub = await js.subscribe(subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    try:
        while head.seq < until:
            msg = await sub.next_msg(timeout=10)
            record, head = chain.verify_next(msg.metadata.sequence.stream, msg.data, head)
            state.apply(record, (msg.headers or {}).get(subjects.HDR_TRACEPARENT, ""))
    finally:
        await sub.unsubscribe()
    return state, head


async def assert_snapshots_fold_alike(js: JetStreamContext, settings: Settings, points: int = 6) -> int:
    """For snapshots at ``points`` positions spread over the log (its first and last record
    included): sealed, checked and loaded as a starting router does, then the tail folded
    by ``router/audit.py``, the state equals the whole log's fold. The log must be at rest.
    Returns how many records it holds."""
    full = RouterState(dedup_horizon_s=settings.dedup_horizon_s)
    head = await audit.recover(js, full, anchor.Watch())
    last = head.seq
    assert last > 0, "the log is empty"
    ingress_first = (await js.stream_info(subjects.INGRESS_STREAM)).state.first_seq
    full.seen.forget_acked_before(ingress_first)
    key = Ed25519PrivateKey.generate()
    snapshots = Snapshots(js, settings, key)
    for at in sorted({1, last, *(last * i // points for i in range(1, points))} - {0}):
        folded, at_head = await fold_until(js, at, settings.dedup_horizon_s)
        data = seal(key, encode_state(folded, at_head), at_head)
        loaded, start = await snapshots._check(data, last, ingress_first, anchor.Watch())
        assert start == at_head
        assert await audit.recover(js, loaded, anchor.Watch(), start) == head
        loaded.seen.forget_acked_before(ingress_first)
        assert canonical(loaded) == canonical(full), f"a snapshot at seq {at} of {last} folds differently"
        # The scheduler looks at no fewer tasks than after a whole fold.
        assert full.dirty <= loaded.dirty
    return last
