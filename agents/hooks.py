"""Pre- and post-run hooks: code that sees every task of the skills it covers, before the
skill runs (and may veto it or change its input) and after (and may veto the result or
change the output), as pre/post tool hooks do in agent SDKs.

Two sources, applied in this order:

- **policy**: the ``[hooks]`` table of the policy file. ``deny`` rules veto a task whose
  input (as JSON text) matches a regular expression; ``disabled`` turns plugin hooks off
  by name::

      [hooks]
      disabled = ["timestamps"]
      [[hooks.deny]]
      skills = ["shell"]
      match = "rm\\\\s+-rf"
      reason = "no recursive deletes"

- **plugins**: objects registered in the ``ledgerbus.hooks`` entry-point group with a
  ``name``, ``skills`` (shell-style patterns, default every skill) and either or both of
  ``async before(ctx, input) -> input`` and ``async after(ctx, input, output) -> output``.

A hook vetoes by raising :class:`Veto`; the task fails with ``vetoed by hook NAME:
REASON`` (one ``task_failed`` record, so the veto is audited). Any other exception from
a hook fails the task too, naming the hook: a hook that breaks never lets a task through
unchecked.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

from ledgerbus.agents.errors import AgentError, SkillError
from ledgerbus.bus.agent_policy import DenyRule, HooksPolicy, read_table
from ledgerbus.bus.errors import ConfigError

if TYPE_CHECKING:
    from ledgerbus.agents.skill import SkillContext

log = structlog.get_logger(__name__)

GROUP = "ledgerbus.hooks"


class Veto(SkillError):
    """Raised by a hook to stop the task; the message is the reason."""


class Hook(Protocol):
    """A hook: ``name``, ``skills`` patterns, and ``before`` and/or ``after``."""

    name: str


class DenyHook:
    """A policy ``deny`` rule as a hook."""

    def __init__(self, rule: DenyRule, index: int) -> None:
        try:
            self.pattern = re.compile(rule.match)
        except re.error as exc:
            raise ConfigError(f"[[hooks.deny]] rule {index + 1}: match {rule.match!r} is not a regular expression: {exc}") from exc
        self.name = f"policy.deny[{index + 1}]"
        self.skills = tuple(rule.skills)
        self.reason = rule.reason or f"input matches {rule.match!r}"

    async def before(self, ctx: SkillContext, input: Any) -> Any:
        """Veto if the input, as JSON text, matches the rule."""
        if self.pattern.search(msgspec.json.encode(msgspec.to_builtins(input)).decode()):
            raise Veto(self.reason)
        return input


def covers(hook: object, skill: str) -> bool:
    """Whether ``hook`` applies to ``skill`` (its ``skills`` patterns; default every skill)."""
    return any(fnmatch.fnmatchcase(skill, p) for p in getattr(hook, "skills", ("*",)))


def load_policy(path: Path) -> HooksPolicy:
    """The ``[hooks]`` table of the policy file at ``path`` (defaults if absent)."""
    return read_table(path, "hooks", HooksPolicy)


def plugins() -> list[object]:
    """Every hook registered in the ``ledgerbus.hooks`` entry-point group, instantiated."""
    found: list[object] = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
            hook = obj() if isinstance(obj, type) else obj
        except Exception as exc:  # a plugin may fail to import in any way; say which
            raise AgentError(f"hook {ep.name!r} from {ep.value} failed to load: {exc}") from exc
        if not (hasattr(hook, "before") or hasattr(hook, "after")):
            raise AgentError(f"hook {ep.name!r} from {ep.value} has neither before() nor after()")
        if not getattr(hook, "name", ""):
            hook.name = ep.name
        found.append(hook)
    return found


class Hooks:
    """The hooks an agent runs around its skills, in order: policy, then plugins."""

    def __init__(self, hooks: Iterable[object] = ()) -> None:
        self.hooks = list(hooks)

    @classmethod
    def load(cls, policy_path: Path) -> Hooks:
        """The policy's deny rules and the installed plugin hooks it does not disable."""
        policy = load_policy(policy_path)
        denies = [DenyHook(rule, i) for i, rule in enumerate(policy.deny)]
        return cls([*denies, *(h for h in plugins() if getattr(h, "name", "") not in policy.disabled)])

    @property
    def names(self) -> list[str]:
        """Each hook's name, in the order they run."""
        return [getattr(h, "name", "?") for h in self.hooks]

    async def before(self, ctx: SkillContext, input: Any) -> Any:
        """Run every covering ``before`` hook in turn; each sees the last one's input."""
        for hook in self.hooks:
            fn = getattr(hook, "before", None)
            if fn is not None and covers(hook, ctx.skill):
                input = await _call(hook, "before", fn(ctx, input))
        return input

    async def after(self, ctx: SkillContext, input: Any, output: Any) -> Any:
        """Run every covering ``after`` hook in turn; each sees the last one's output."""
        for hook in self.hooks:
            fn = getattr(hook, "after", None)
            if fn is not None and covers(hook, ctx.skill):
                output = await _call(hook, "after", fn(ctx, input, output))
        return output


async def _call(hook: object, stage: str, pending: Any) -> Any:
    name = getattr(hook, "name", "?")
    try:
        return await pending
    except Veto as exc:
        raise Veto(f"vetoed by hook {name}: {exc}") from exc
    except Exception as exc:  # a hook may raise anything: the task fails, naming it
        log.warning("hook_failed", hook=name, stage=stage, error=str(exc))
        raise SkillError(f"hook {name} ({stage}) failed: {type(exc).__name__}: {exc}") from exc
