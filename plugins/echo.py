"""``echo``: returns its input. The smallest useful skill, for demos and tests."""

from __future__ import annotations

from typing import Any

from ledgerbus.agents.skill import SkillContext


class EchoSkill:
    """Return the input unchanged."""

    name = "echo"
    description = "Return the input unchanged."
    uses_workspace = False
    """No files, no commands: its attempts get no workspace directory."""
    claim_first = False
    """No side effects: it may run before its claim is accepted (its result carries the claim)."""
    capabilities = ("text", "echo")
    """What plan steps naming capabilities may ask of it (the router matches on these)."""

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        """Echo ``input`` back as the output."""
        return input
