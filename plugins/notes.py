"""``notes``: run a short script of memory operations; shows (and tests) ``ctx.memory``,
``ctx.shared`` and ``ctx.tasks`` end to end.

Input ``{"steps": [...]}``, each step one of::

    {"observe": VALUE}                        append to this agent's observations
    {"reason": VALUE}                         append to its reasoning history
    {"remember": KEY, "value": V, "core": B}  set knowledge (core survives a wipe)
    {"recall": KEY}                           read knowledge            → result
    {"share": KEY, "namespace": NS, "value": V, "ttl_s": S}
    {"read": KEY, "namespace": NS}            read shared context       → result (null if absent/expired)
    {"checkpoint": LABEL}                     checkpoint this agent's memory → result (its id)
    {"delegate": SKILL, "input": {...}}       run a subtask on whichever agent has SKILL, wait → result (its output)

The output is ``{"results": [...]}``, one entry per step that reads something.
"""

from __future__ import annotations

from typing import Any

from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.skill import SkillContext

_VERBS = ("observe", "reason", "remember", "recall", "share", "read", "checkpoint", "delegate")


class NotesSkill:
    """Apply ``input["steps"]`` to this agent's memory and the shared context, in order."""

    name = "notes"
    description = "Run a script of memory steps (observe, remember, recall, share, read, checkpoint, delegate)."
    uses_workspace = False
    """No files, no commands: its attempts get no workspace directory."""
    capabilities = ("memory", "notes")
    """What plan steps naming capabilities may ask of it (the router matches on these)."""

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        """Run each step; collect what the reading steps return."""
        steps = input.get("steps")
        if not isinstance(steps, list):
            raise SkillError("input.steps must be a list of steps")
        results: list[Any] = []
        for i, step in enumerate(steps):
            verb = next((v for v in _VERBS if isinstance(step, dict) and v in step), None)
            if verb is None:
                raise SkillError(f"step {i} must be an object with one of: {', '.join(_VERBS)}")
            arg = step[verb]
            match verb:
                case "observe":
                    await ctx.memory.observe(arg)
                case "reason":
                    await ctx.memory.reason(arg)
                case "remember":
                    await ctx.memory.remember(str(arg), step.get("value"), core=bool(step.get("core", False)))
                case "recall":
                    results.append(await ctx.memory.recall(str(arg)))
                case "share":
                    await ctx.shared.set(_namespace(step), str(arg), step.get("value"), ttl_s=step.get("ttl_s"))
                case "read":
                    results.append(await ctx.shared.get(_namespace(step), str(arg)))
                case "checkpoint":
                    results.append(await ctx.memory.checkpoint(label=str(arg)))
                case "delegate":
                    child = await ctx.tasks.submit(str(arg), step.get("input") or {})
                    done = await ctx.tasks.wait(child)
                    if done["status"] != "completed":
                        raise SkillError(f"subtask {child} ({arg}) {done['status']}: {done.get('error')}")
                    results.append(done["output"])
        return {"results": results}


def _namespace(step: dict[str, Any]) -> str:
    namespace = step.get("namespace")
    if not isinstance(namespace, str):
        raise SkillError("a share or read step needs a namespace")
    return namespace
