"""Pipelines for ``agentctl submit --pipeline NAME "REQUIREMENT"``: plan templates whose
steps are roles, each played by the agent profile of the same name.

``sop`` is a standard operating procedure for building software, one role after the
other: ``product_manager`` (what to build) → ``architect`` (how) → ``developer`` (the
code) → ``qa`` (does it work). Each step runs the first skill of its role's profile
(``product-manager``, ``architect``, ``developer``, ``qa`` in the profiles file) with the
input ``{"requirement", "role", "instructions", "guardrails", "handoffs", "checks"}`` taken
from the profile, on the agent of that name when it is live (``role``), else on the best fit
for the skill, which plays the role from the input. Each step depends on every step before
it, so its context holds the outputs of all earlier roles (the pipeline's memory, which
spans all its agents); ``llm.chat`` bounds what of it goes into the prompt.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from ledgerbus.agents import profiles
from ledgerbus.bus import codec
from ledgerbus.bus.errors import SchemaError
from ledgerbus.bus.events import DEFAULT_TASK_TIMEOUT_S, NO_RETRY, PlanStep, PlanSubmitted, RetryPolicy, new_id

PIPELINES: dict[str, tuple[tuple[str, str], ...]] = {
    "sop": (("product_manager", "product-manager"), ("architect", "architect"), ("developer", "developer"),
            ("qa", "qa")),
}
"""pipeline → its steps in order, each ``(step id, role profile)``; each step depends on the one before."""


def plan(
    pipeline: str,
    requirement: str,
    profiles_path: Path,
    task_id: str | None = None,
    timeout_s: float = DEFAULT_TASK_TIMEOUT_S,
    retry: RetryPolicy = NO_RETRY,
) -> PlanSubmitted:
    """The plan of ``pipeline`` for ``requirement``, from the role profiles in ``profiles_path``.

    Raises :class:`agents.profiles.ProfileError` when a role has no profile, and
    :class:`bus.errors.SchemaError` when the plan would not pass the router's schema.
    """
    roles = PIPELINES[pipeline]
    known = profiles.load(profiles_path).profiles
    missing = [role for _, role in roles if role not in known]
    if missing:
        raise profiles.ProfileNotFound(
            f"the {pipeline} pipeline needs the profiles {', '.join(r for _, r in roles)} in {profiles_path}; "
            f"missing: {', '.join(missing)} (known: {', '.join(sorted(known)) or 'none'})")
    steps: list[PlanStep] = []
    for step_id, role in roles:
        profile = known[role]
        steps.append(PlanStep(
            id=step_id, skill=profile.skills[0], deps=[s.id for s in steps], timeout_s=timeout_s,
            retry=retry, role=role,
            input={"requirement": requirement, "role": role, "instructions": profile.instructions,
                   "guardrails": list(profile.guardrails), "handoffs": list(profile.handoffs),
                   **({"checks": codec.to_builtins(profile.checks)} if profile.checks is not None else {})},
        ))
    event = PlanSubmitted(id=new_id(), task_id=task_id or new_id(), steps=steps, name=f"{pipeline}: {requirement}"[:128])
    # Through the router's own schema, so an oversized requirement or a bad task id is said here.
    try:
        checked = codec.decode_event(codec.encode(event))
    except (TypeError, msgspec.EncodeError) as exc:
        raise SchemaError(str(exc)) from exc
    assert isinstance(checked, PlanSubmitted)
    return checked
