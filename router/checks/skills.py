"""Skills: a principal may submit only the skills its policy allows."""

from __future__ import annotations

from ledgerbus.bus.events import TaskSubmitted
from ledgerbus.router.checks import Check, Inbound, Rejection
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState


def make(policy: PolicyFile) -> Check:
    """A skill check reading the policy in force at each message."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        if isinstance(msg.event, TaskSubmitted):
            current = policy.current()
            if not current.may_submit(msg.principal_token, msg.event.skill):
                allowed = ", ".join(current.allowed_skills(msg.principal_token)) or "none"
                return Rejection(
                    "skill_not_allowed", f"{msg.principal_token} may not submit {msg.event.skill} (allowed: {allowed})"
                )
        return None

    return check
