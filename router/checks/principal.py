"""Principal: who sent the message comes from the subject token, never from the body.

``check`` validates the ``in.<principal kind>.<name>.<kind>`` subject; ``check_kind_allowed`` then
decides whether that kind of principal may send that kind of message at all.
"""

from __future__ import annotations

from ledgerbus.bus import subjects
from ledgerbus.bus.events import AgentLeft, kind_of
from ledgerbus.router.checks import Inbound, Learned, Rejection, learned
from ledgerbus.router.state import RouterState

# Memory, checkpoints and shared context: agents on their own memory, operators on any
# agent's (the memory check tells the two apart).
_MEMORY_KINDS = {"memory_written", "memory_wiped", "checkpoint_saved", "checkpoint_restored", "shared_written"}

# Nobody sends the router's own decisions (task_dispatched, task_retry_scheduled,
# task_dead_lettered, skill_unmatched): they are not in any list below.
ALLOWED_KINDS: dict[str, frozenset[str]] = {
    "cli": frozenset(
        {"task_submitted", "plan_submitted", "task_cancelled", "task_approved", "task_denied", "proposal_approved",
         "run_forked", *_MEMORY_KINDS}
    ),
    "agent": frozenset(
        {"task_submitted", "plan_submitted", "task_cancelled", "task_started", "task_progress", "task_completed", "task_failed", "task_usage",
         "agent_joined", "agent_left", *_MEMORY_KINDS}
    ),
    "projector": frozenset(),
    "router": frozenset(),
}


def check(msg: Inbound, state: RouterState) -> Rejection | Learned:
    """The subject must be ``in.<principal kind>.<name>.<kind>`` with a known principal kind."""
    try:
        principal, kind_token = subjects.parse_ingress(msg.subject)
    except subjects.SubjectError as exc:
        return Rejection("bad_subject", str(exc))
    return learned(principal=principal, kind_token=kind_token)


def check_kind_allowed(msg: Inbound, state: RouterState) -> Rejection | None:
    """The body's kind must match the subject's, and be one this principal kind may send."""
    assert msg.principal is not None and msg.event is not None
    kind = kind_of(type(msg.event))
    if kind != msg.kind_token:
        return Rejection("kind_mismatch", f"subject says {msg.kind_token!r} but the body is {kind!r}")
    if kind not in ALLOWED_KINDS.get(msg.principal.kind, frozenset()):
        return Rejection("kind_not_allowed", f"a {msg.principal.kind} principal may not send {kind}")
    if isinstance(msg.event, AgentLeft) and msg.event.agent not in ("", msg.principal.name):
        # Only the router says another agent left (its heartbeat lapsed).
        return Rejection("kind_not_allowed", f"agent {msg.principal.name} may not say that agent {msg.event.agent} left")
    return None
