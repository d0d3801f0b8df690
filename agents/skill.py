"""The skill plugin API: what a skill is and what it is given when it runs.

A skill is any object with a ``name``, a ``description`` and an async ``run(ctx, input)``
returning a JSON-able result. Register it in the ``ledgerbus.skills`` entry-point group::

    [project.entry-points."ledgerbus.skills"]
    echo = "plugins.echo:EchoSkill"

Raise :class:`agents.errors.SkillError` for a failure whose message should be the
task's error; any other exception is reported as ``<ExceptionType>: <message>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog

from agents.memory import Memory, Shared, Tasks


@dataclass(frozen=True, slots=True)
class SkillContext:
    """What a running skill may know and do."""

    task_id: str
    skill: str
    attempt: int
    agent: str
    deadline: float
    """``loop.time()`` by which the skill must finish; it is cancelled then."""
    log: structlog.typing.FilteringBoundLogger
    memory: Memory
    """This agent's memory: knowledge, observations, reasoning, role; checkpoints."""
    shared: Shared
    """Context shared with other agents, by namespace and key, with optional expiry."""
    tasks: Tasks
    """Hand work to other agents (subtasks of this task) and read tasks."""
    _progress: Callable[[str, float | None], Awaitable[None]]
    _usage: Callable[[int, int, float, str, str], Awaitable[None]]
    _handoff: Callable[[str, dict[str, Any]], Awaitable[str]] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    """For a plan step: the outputs of exactly the steps it depends on, by step id."""
    parent_task_id: str | None = None
    """The plan (or the task whose skill submitted this one), if any."""
    step: str = ""
    """For a plan step: its id in the plan."""

    async def progress(self, message: str = "", fraction: float | None = None) -> None:
        """Report progress (recorded in the audit log, shown by ``agentctl submit --wait``)."""
        await self._progress(message, fraction)

    async def usage(
        self, tokens_in: int = 0, tokens_out: int = 0, cost_usd: float = 0.0, provider: str = "", model: str = ""
    ) -> None:
        """Report what the task spent (one LLM call, say); the router enforces its budget."""
        await self._usage(tokens_in, tokens_out, cost_usd, provider, model)


    async def delegate(self, skill: str, input: dict[str, Any] | None = None,
                       timeout_s: float | None = None) -> Any:
        """Run ``skill`` on ``input`` as a subtask of this task (on whichever agent serves it)
        and return its output; raise :class:`agents.errors.SkillError` if it does not complete.

        The subtask is an event like any other (``task_submitted`` with this task as its
        parent), so policy bounds it and cancelling this task cancels it.
        """
        from agents.errors import SkillError

        remaining = max(self.deadline - asyncio.get_running_loop().time(), 1.0)
        task_id = await self.tasks.submit(skill, input or {}, timeout_s=min(timeout_s or remaining, remaining))
        done = await self.tasks.wait(task_id)
        if done["status"] != "completed":
            raise SkillError(f"delegated {skill} task {task_id} {done['status']}: {done.get('error') or ''}".rstrip(": "))
        return done.get("output")


    async def handoff(self, role: str, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Hand this task's work over to another role: a subtask (``handoff`` marked, this
        task its parent) for the first skill of the profile named ``role``, with
        ``context`` and the role's instructions as its input. Return the result as this
        skill's output: ``{"handed_off_to": task id, "role": role}``.

        An agent started from a profile may hand off only to that profile's ``handoffs``.
        """
        if self._handoff is None:
            from agents.errors import SkillError

            raise SkillError("handoff is not available here")
        task_id = await self._handoff(role, context or {})
        return {"handed_off_to": task_id, "role": role}


@runtime_checkable
class Skill(Protocol):
    """A unit of capability an agent can run.

    A skill may also declare ``capabilities`` (a tuple of free-form words, e.g.
    ``("python", "testing")``): plan steps that name capabilities instead of a skill are
    routed to the skill that provides them best.
    """

    name: str
    description: str

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        """Do the work and return a JSON-able output."""
        ...
