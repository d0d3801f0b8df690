"""Skill discovery through the ``ledgerbus.skills`` entry-point group.

Built-in skills (``plugins/``) are registered through the same group as third-party
ones, so there is one door for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import structlog

from ledgerbus.agents.errors import AgentError, SkillNotFound
from ledgerbus.agents.skill import Skill, input_type, output_type, schemas

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


@dataclass(frozen=True, slots=True)
class SkillInfo:
    """What an installed skill declares, read from its class without running anything."""

    name: str
    description: str
    capabilities: frozenset[str]
    input_type: Any
    """a msgspec-convertible type, or ``None`` (any JSON object)"""
    output_type: Any
    source: str
    """the entry point (``module:Class``) and the distribution that provides it"""

    def describe(self) -> dict[str, Any]:
        """For ``agentctl skills --json``: everything, with JSON schemas for the types."""
        return {"name": self.name, "description": self.description, "capabilities": sorted(self.capabilities),
                "source": self.source, **schemas(self)}


def catalog() -> dict[str, SkillInfo]:
    """Every installed skill's declaration, by name, without instantiating it; a skill that
    fails to import is left out (and logged)."""
    found: dict[str, SkillInfo] = {}
    for name, ep in sorted(available().items()):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a plugin may fail to import in any way
            log.warning("skill_import_failed", skill=name, error=str(exc))
            continue
        dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist is not None else ""
        found[name] = SkillInfo(
            name=name, description=str(getattr(obj, "description", "") or ""),
            capabilities=frozenset(getattr(obj, "capabilities", ()) or ()),
            input_type=input_type(obj), output_type=output_type(obj), source=f"{ep.value}{dist}",
        )
    return found


def capabilities() -> dict[str, frozenset[str]]:
    """Every installed skill and the capabilities its class declares (``capabilities``)."""
    return {name: info.capabilities for name, info in catalog().items()}
