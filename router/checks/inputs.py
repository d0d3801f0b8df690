"""Inputs: a task for a skill that declares an ``input_type`` must carry an input of
that type, or it is rejected here, with the path of what is wrong, before anything runs.

Only skills installed beside the router can be checked (their types are Python classes);
the agent checks again before it runs any skill, so a skill installed only on agents is
still never run on a bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ledgerbus.bus.events import PlanSubmitted, TaskSubmitted
from ledgerbus.bus.problems import explain
from ledgerbus.router.checks import Check, Inbound, Rejection
from ledgerbus.router.state import RouterState


def problem(types: Mapping[str, Any], skill: str, value: Any) -> str | None:
    """Why ``value`` is not an input for ``skill`` (``None``: it is, or nothing says)."""
    wanted = types.get(skill)
    if wanted is None:
        return None
    try:
        msgspec.convert(value, wanted, strict=False)
    except msgspec.ValidationError as exc:
        return f"input does not match {skill}'s schema: {explain(exc)}"
    return None


def make(types: Callable[[], Mapping[str, Any]]) -> Check:
    """An input check against ``types()``: skill → its declared input type."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        match msg.event:
            case TaskSubmitted(skill=skill, input=value):
                why = problem(types(), skill, value)
                if why:
                    return Rejection("invalid_input", why)
            case PlanSubmitted(steps=steps):
                known = types()
                for step in steps:
                    why = problem(known, step.skill, step.input) if step.skill else None
                    if why:
                        return Rejection("invalid_input", f"step {step.id}: {why}")
        return None

    return check
