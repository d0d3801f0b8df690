"""Unserved skills: a submission of a skill nobody serves is not left to wait in silence.

A skill is served when a skill of that name is installed beside the router (its entry
point), a live agent offers it (its heartbeat in the ``agents`` bucket), or an agent
advertising it joined within the heartbeat TTL. The last covers the moment after an agent
starts: its ``agent_joined`` record can reach the router before its first heartbeat
reaches the router's watch, and a skill an agent serves must not be flagged for that.
(The router also reads the whole bucket at start before it serves anything.)

Policy ``[tasks] unserved`` says what becomes of a submission of an unserved skill:

- ``warn`` (the default): accepted with code ``no_agent`` and a reason naming the skill
  and what the live agents offer; it goes to WORK and waits there for an agent with it;
- ``reject``: rejected with ``no_agent`` (nothing reaches WORK);
- ``propose``: accepted with code ``awaiting_match`` and held; the scheduler dispatches it
  to the live skill that provides it best (by name or capability), and until one does it
  records ``skill_unmatched`` with a proposed agent, as for a plan step.

A submission also held for approval keeps ``approval_requested``; the warning is added to
its reason. A skill name too long to be a capability cannot be proposed: it is warned about.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta

from ledgerbus.bus.events import TaskSubmitted
from ledgerbus.bus.lifecycle import NO_AGENT
from ledgerbus.router.checks import Check, Inbound, Learned, Rejection, learned
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState

_MAX_CAPABILITY = 64
"""A skill proposed on is needed as a capability (bus.events.Capability), at most this long."""

_LISTED = 20
"""At most this many of the live agents' skills are named in a reason."""


def make(
    policy: PolicyFile,
    installed: Callable[[], Collection[str]],
    live_skills: Callable[[], Collection[str]],
    joined_within_s: float,
) -> Check:
    """The unserved-skill check. ``installed`` lists the skills installed beside the router,
    ``live_skills`` those the live agents offer now; an agent that joined less than
    ``joined_within_s`` ago (the heartbeat TTL) counts as live."""
    recent = timedelta(seconds=joined_within_s)

    def check(msg: Inbound, state: RouterState) -> Rejection | Learned | None:
        if not isinstance(msg.event, TaskSubmitted) or msg.event.kept is not None:
            return None  # a fork's kept subtask runs nowhere
        skill = msg.event.skill
        if skill in installed():
            return None
        live = live_skills()
        if skill in live:
            return None
        joined = state.joined_at.get(skill)
        # The INGRESS timestamp, not the clock: the same message gets the same verdict.
        at = datetime.fromtimestamp(msg.received_at, UTC) if msg.received_at else datetime.now(UTC)
        if joined is not None and joined > at - recent:
            return None
        offered = ", ".join(sorted(live)[:_LISTED]) + (", ..." if len(live) > _LISTED else "")
        why = (f"no agent serves {skill}: it is not installed beside the router and no live agent offers it "
               f"(live agents offer: {offered or 'nothing'})")
        mode = policy.current().tasks.unserved
        if mode == "reject":
            return Rejection(NO_AGENT, why)
        if mode == "propose" and len(skill) <= _MAX_CAPABILITY:
            return learned(await_match=True,
                           unserved=f"{why}; it waits for a live skill that provides {skill}, and an agent is proposed")
        return learned(unserved=f"{why}; it waits in WORK until an agent with {skill} starts")

    return check
