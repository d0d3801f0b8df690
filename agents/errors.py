"""Errors of the agents package."""

from __future__ import annotations

from ledgerbus.bus.errors import LedgerbusError


class AgentError(LedgerbusError):
    """Root of the agent runtime's errors."""


class SkillNotFound(AgentError):
    """No installed plugin provides the requested skill."""


class SkillError(AgentError):
    """A skill failed in a way it wants reported as the task's error, as written."""


class BudgetError(SkillError):
    """An LLM call was not made: at its most it would cross the budget over the task."""
