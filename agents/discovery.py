"""Skill discovery through the ``ledgerbus.skills`` entry-point group.

Built-in skills (``plugins/``) are registered through the same group as third-party
ones, so there is one door for both.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import structlog

from agents.errors import AgentError, SkillNotFound
from agents.skill import Skill

log = structlog.get_logger(__name__)

GROUP = "ledgerbus.skills"


def available() -> dict[str, EntryPoint]:
    """Every installed skill's entry point, by skill name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(name: str) -> Skill:
    """Load and instantiate one skill; raise :class:`SkillNotFound` if nothing provides it."""
    eps = available()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise SkillNotFound(f"no installed skill named {name!r} (installed: {known})")
    try:
        obj = eps[name].load()
        skill = obj() if isinstance(obj, type) else obj
    except Exception as exc:  # a plugin may fail to import in any way; say which
        raise AgentError(f"skill {name!r} from {eps[name].value} failed to load: {exc}") from exc
    if not isinstance(skill, Skill):
        raise AgentError(f"{eps[name].value} is not a Skill (needs name, description, async run)")
    if skill.name != name:
        raise AgentError(f"entry point {name!r} provides a skill named {skill.name!r}")
    return skill


def load_many(names: list[str]) -> dict[str, Skill]:
    """Load several skills by name."""
    return {name: load(name) for name in names}


def capabilities() -> dict[str, frozenset[str]]:
    """Every installed skill and the capabilities its class declares (``capabilities``),
    without instantiating it; a skill that fails to import is left out (and logged)."""
    found: dict[str, frozenset[str]] = {}
    for name, ep in available().items():
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a plugin may fail to import in any way
            log.warning("skill_import_failed", skill=name, error=str(exc))
            continue
        found[name] = frozenset(getattr(obj, "capabilities", ()) or ())
    return found
