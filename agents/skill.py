"""The skill plugin API: what a skill is and what it is given when it runs.

A skill is any object with a ``name``, a ``description`` and an async ``run(ctx, input)``
returning a JSON-able result. Register it in the ``ledgerbus.skills`` entry-point group::

    [project.entry-points."ledgerbus.skills"]
    echo = "ledgerbus.plugins.echo:EchoSkill"

A skill may declare its ``input_type`` (a msgspec Struct): the task's input is then
checked against it before anything runs (by the router when the skill is installed beside
it, and by the agent in any case) and ``run`` receives the decoded Struct; a mismatch is
rejected with its path (``$.steps[2].seconds``). An ``output_type`` is checked the same
way on the way out, and both appear as JSON schemas in ``agentctl skills``.

Raise :class:`agents.errors.SkillError` for a failure whose message should be the
task's error; any other exception is reported as ``<ExceptionType>: <message>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec
import structlog
from opentelemetry import trace

from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.memory import Memory, Shared, Tasks
from ledgerbus.bus.lifecycle import Status
from ledgerbus.bus.problems import explain

if TYPE_CHECKING:
    from ledgerbus.agents.llm.router import LLM


class InputError(SkillError):
    """The task's input does not match the skill's ``input_type``; the message has the path."""


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
    """Bound to the task, skill and agent; lines inside a span carry its trace ids."""
    memory: Memory
    """This agent's memory: knowledge, observations, reasoning, role; checkpoints."""
    shared: Shared
    """Context shared with other agents, by namespace and key, with optional expiry."""
    tasks: Tasks
    """Hand work to other agents (subtasks of this task) and read tasks."""
    _progress: Callable[[str, float | None], Awaitable[None]]
    _usage: Callable[..., Awaitable[None]]
    _handoff: Callable[[str, dict[str, Any]], Awaitable[str]] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    """For a plan step: the outputs of exactly the steps it depends on, by step id (also
    written to ``workspace/context/<step>.json``)."""
    parent_task_id: str | None = None
    """The plan (or the task whose skill submitted this one), if any."""
    step: str = ""
    """For a plan step: its id in the plan."""
    workspace: Path = Path(".")
    """A directory of this task's own: ``context/`` holds the dependency outputs,
    ``output/`` is for files the skill produces. Sandboxed commands run in it."""
    role: str = ""
    """The profile the agent was started from (``agentctl agent --profile``), if any."""
    instructions: str = ""
    """That profile's instructions (what the agent is for), to prepend to LLM prompts."""
    llm: LLM | None = None
    """LLM calls routed for this skill (and role) by the routing file: ``await
    ctx.llm.chat("...")``. Every call is reported as usage against this task's budget."""
    tracer: trace.Tracer = field(default_factory=lambda: trace.get_tracer("ledgerbus.skill"))
    """For spans of the skill's own (children of the agent's ``agent.run`` span)."""

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(self.deadline - asyncio.get_running_loop().time(), 0.0)

    def output_dir(self) -> Path:
        """``workspace/output``: files a skill leaves there are listed in its result by
        skills that produce files (the shell and python skills do)."""
        return self.workspace / "output"

    async def progress(self, message: str = "", fraction: float | None = None) -> None:
        """Report progress (recorded in the audit log, shown by ``agentctl submit --wait``)."""
        await self._progress(message, fraction)

    async def usage(
        self, tokens_in: int = 0, tokens_out: int = 0, cost_usd: float = 0.0, provider: str = "", model: str = "",
        latency_s: float = 0.0, outcome: str = "ok",
    ) -> None:
        """Report what the task spent (one LLM call, say); the router enforces its budget.
        ``ctx.llm`` reports its calls itself."""
        await self._usage(tokens_in, tokens_out, cost_usd, provider, model, latency_s, outcome)

    def require_llm(self) -> LLM:
        """``ctx.llm``, or a :class:`SkillError` saying LLM calls are not configured here."""
        if self.llm is None:
            raise SkillError("this agent has no LLM router (no routing file was loaded)")
        return self.llm

    async def delegate(self, skill: str, input: dict[str, Any] | None = None,
                       timeout_s: float | None = None) -> Any:
        """Run ``skill`` on ``input`` as a subtask of this task (on whichever agent serves it)
        and return its output; raise :class:`agents.errors.SkillError` if it does not complete.

        The subtask is an event like any other (``task_submitted`` with this task as its
        parent), so policy bounds it and cancelling this task cancels it.
        """
        remaining = max(self.remaining(), 1.0)
        task_id = await self.tasks.submit(skill, input or {}, timeout_s=min(timeout_s or remaining, remaining))
        done = await self.tasks.wait(task_id)
        if done["status"] != Status.COMPLETED:
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
            raise SkillError("handoff is not available here")
        task_id = await self._handoff(role, context or {})
        return {"handed_off_to": task_id, "role": role}


@runtime_checkable
class Skill(Protocol):
    """A unit of capability an agent can run.

    Optional attributes a skill may also declare:

    - ``capabilities``: a tuple of free-form words (``("python", "testing")``); plan steps
      that name capabilities instead of a skill are routed to the skill that fits best;
    - ``input_type`` / ``output_type``: msgspec Structs (or any type msgspec can convert
      to) for the input ``run`` receives and the output it returns;
    - ``uses_workspace = False``: the skill writes no files and runs no commands, so its
      attempts get no workspace directory (``ctx.workspace`` then names a path that does
      not exist); the default, ``True``, makes one per attempt;
    - ``uses_llm = True``: the skill calls ``ctx.llm``, so its agent makes the LLM
      providers (imports their SDKs, seconds) in the background once it has joined. A skill
      that does not say so may still call ``ctx.llm``: its first call makes the provider.
    """

    name: str
    description: str

    async def run(self, ctx: SkillContext, input: Any) -> Any:
        """Do the work and return a JSON-able output (or an ``output_type`` value)."""
        ...


def input_type(skill: object) -> Any:
    """The skill's declared input type, or ``None`` (it takes the input as a dict)."""
    return getattr(skill, "input_type", None)


def output_type(skill: object) -> Any:
    """The skill's declared output type, or ``None``."""
    return getattr(skill, "output_type", None)


def decode_input(skill: object, raw: Any) -> Any:
    """The input as ``run`` receives it: converted to ``input_type`` if the skill declares
    one, else as is. Raise :class:`InputError` with msgspec's path for a mismatch."""
    wanted = input_type(skill)
    if wanted is None:
        return raw
    try:
        return msgspec.convert(raw, wanted, strict=False)
    except msgspec.ValidationError as exc:
        raise InputError(f"input does not match {getattr(skill, 'name', '?')}'s schema: {explain(exc)}") from exc


def encode_output(skill: object, output: Any) -> Any:
    """The output as it travels (JSON-able builtins), checked against ``output_type``."""
    wanted = output_type(skill)
    if wanted is not None:
        try:
            output = msgspec.convert(msgspec.to_builtins(output), wanted)
        except msgspec.ValidationError as exc:
            raise SkillError(f"{getattr(skill, 'name', '?')} returned output that does not match its schema: "
                             f"{explain(exc)}") from exc
    try:
        return msgspec.to_builtins(output)
    except TypeError as exc:
        raise SkillError(f"output is not JSON: {exc}") from exc


def schemas(skill: object) -> dict[str, Any]:
    """The JSON schemas of the skill's input and output (``None`` where undeclared)."""
    out: dict[str, Any] = {}
    for key, wanted in (("input", input_type(skill)), ("output", output_type(skill))):
        out[key] = msgspec.json.schema(wanted) if wanted is not None else None
    return out
