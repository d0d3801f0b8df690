"""``plan``: decompose a task written in plain language into a plan, and run it.

The model is asked for structured output against the JSON schema of :class:`Draft`
(derived from the msgspec type, so the schema and the check cannot drift apart), told
which skills it may use and what input each takes. Its answer is checked as the router
would check it: the shape (:class:`Draft`), the plan rules (unique ids, known deps, no
cycle, a skill or capabilities per step: :func:`bus.plans.validate`), and each step's
input against its skill's declared input type. A malformed answer is sent back once,
with the error; a second malformed answer fails the task saying what was wrong. There is
no fallback plan.

The plan is then submitted as a subtask of this task (cancelling this task cancels it)
and, unless ``wait`` is false, waited for: the output carries the plan's own result.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec

from ledgerbus.agents import discovery
from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message, ProviderError
from ledgerbus.agents.llm.schema import for_type
from ledgerbus.agents.memory import WriteRejected
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus.events import NO_RETRY, PlanStep, PlanSubmitted, RetryPolicy
from ledgerbus.bus.plans import validate
from ledgerbus.bus.problems import explain
from ledgerbus.bus.subjects import SKILL_PATTERN

_StepId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]{1,32}$", description="a-z A-Z 0-9 _, at most 32")]


class DraftStep(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step as the model writes it."""

    id: _StepId
    skill: Annotated[str, msgspec.Meta(pattern=SKILL_PATTERN)] | None = None
    capabilities: list[str] = msgspec.field(default_factory=list)
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    deps: list[_StepId] = msgspec.field(default_factory=list)
    priority: Annotated[int, msgspec.Meta(ge=0, le=10)] = 5


class Draft(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A plan as the model writes it: steps, each after the steps in its ``deps``."""

    steps: Annotated[list[DraftStep], msgspec.Meta(min_length=1, max_length=100)]


class PlanInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What to plan, with what, and whether to run it."""

    task: Annotated[str, msgspec.Meta(min_length=1, max_length=20_000)]
    skills: list[str] = msgspec.field(default_factory=list)
    """the skills the plan may use (default: every skill installed here but plan and reason)"""
    max_steps: Annotated[int, msgspec.Meta(ge=1, le=100)] = 12
    submit: bool = True
    """false: return the checked plan without running it"""
    wait: bool = True
    """false: return once the plan is accepted, with its task id"""
    step_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    retry: RetryPolicy = NO_RETRY
    """applied to every step"""


class PlanOutput(msgspec.Struct, frozen=True, kw_only=True):
    """The plan, its task id once submitted, and its result once it ended."""

    steps: list[PlanStep]
    plan_task_id: str | None = None
    status: str = "drafted"
    output: Any = None


SYSTEM = """You are the planner of a multi-agent system. Break the user's task into steps that \
agents run. Each step names exactly one of the available skills (or, instead, the capabilities \
it needs), gives that skill's input as a JSON object matching the skill's input schema, and lists \
in `deps` the ids of the steps whose outputs it needs (those outputs are handed to it when it \
runs). Steps without dependencies between them run in parallel. Use short ids (letters, digits, \
underscores). Priority 0-10: higher runs first when several steps are ready. Use at most \
{max_steps} steps. Answer only through the structured output."""


def _skill_lines(names: list[str], infos: dict[str, discovery.SkillInfo]) -> str:
    lines = []
    for name in names:
        info = infos.get(name)
        if info is None:
            lines.append(f"- {name}")
            continue
        shown = json.dumps(for_type(info.input_type)) if info.input_type is not None else "any JSON object"
        lines.append(f"- {name}: {info.description} Input schema: {shown}")
    return "\n".join(lines)


class PlanSkill:
    """Ask the model for a plan, check it, submit it, wait for it."""

    name = "plan"
    description = "Decompose a task into a plan of skills with dependencies (LLM structured output), then run it."
    uses_workspace = False
    """No files, no commands: its attempts get no workspace directory."""
    capabilities = ("planning", "decomposition")
    uses_llm = True  # the agent imports the LLM SDKs ahead, in the background
    input_type = PlanInput
    output_type = PlanOutput

    async def run(self, ctx: SkillContext, input: PlanInput) -> PlanOutput:
        """Draft (at most twice), check, submit, wait."""
        infos = discovery.catalog()
        names = input.skills or [n for n in infos if n not in (self.name, "reason")]
        steps = await self.draft(ctx, input, names, infos)
        if not input.submit:
            return PlanOutput(steps=steps)
        try:
            plan_id = await ctx.tasks.submit_plan(steps, name=f"plan: {input.task}")
        except WriteRejected as exc:
            raise SkillError(f"the router rejected the model's plan: {exc}") from exc
        await ctx.progress(f"submitted plan {plan_id} ({len(steps)} steps)")
        if not input.wait:
            return PlanOutput(steps=steps, plan_task_id=plan_id, status="submitted")
        done = await ctx.tasks.wait(plan_id)
        if done["status"] != "completed":
            raise SkillError(f"plan {plan_id} {done['status']}: {done.get('error') or ''}".rstrip(": "))
        return PlanOutput(steps=steps, plan_task_id=plan_id, status="completed", output=done.get("output"))

    async def draft(self, ctx: SkillContext, input: PlanInput, names: list[str],
                    infos: dict[str, discovery.SkillInfo]) -> list[PlanStep]:
        """The model's plan, checked; one more try with the error if the first is invalid."""
        llm = ctx.require_llm()
        prompt = f"Task:\n{input.task}\n\nAvailable skills:\n{_skill_lines(names, infos)}"
        if ctx.context:
            prompt += "\n\nWhat earlier steps produced:\n" + json.dumps(ctx.context, indent=2, ensure_ascii=False)
        messages = [Message(role="user", content=prompt)]
        schema = for_type(Draft)
        error = ""
        for attempt in (1, 2):
            request = ChatRequest(messages=messages, system=SYSTEM.format(max_steps=input.max_steps), schema=schema,
                                  schema_name="plan")
            try:
                result = await llm.chat(request)
            except ProviderError as exc:
                raise SkillError(str(exc)) from exc
            error = check(result, input, names, infos)
            if not error:
                return steps_of(result, input)
            ctx.log.warning("plan_invalid", attempt=attempt, error=error)
            await ctx.progress(f"model's plan was invalid ({error}); asking again" if attempt == 1 else "")
            messages += [Message(role="assistant", content=result.text or "(no answer)"),
                         Message(role="user", content=f"That plan is invalid: {error}\n"
                                                      "Answer again with a corrected plan for the same task.")]
        raise SkillError(f"the model's plan was invalid twice; last error: {error}")


def steps_of(result: ChatResult, input: PlanInput) -> list[PlanStep]:
    """The checked draft as plan steps (with the input's timeout and retry policy)."""
    draft = msgspec.convert(result.data, Draft)
    return [PlanStep(id=s.id, skill=s.skill, capabilities=s.capabilities, input=s.input, deps=s.deps,
                     priority=s.priority, timeout_s=input.step_timeout_s, retry=input.retry) for s in draft.steps]


def check(result: ChatResult, input: PlanInput, names: list[str], infos: dict[str, discovery.SkillInfo]) -> str:
    """What is wrong with the model's answer as a plan ("" if nothing)."""
    if not isinstance(result.data, dict):
        return f"the answer is not a JSON object matching the schema (got: {result.text[:200]!r})"
    try:
        steps = steps_of(result, input)
        # Through the event's own schema: the same patterns and bounds the router applies.
        plan = msgspec.convert({"id": "x", "task_id": "draft", "steps": msgspec.to_builtins(steps)}, PlanSubmitted)
    except msgspec.ValidationError as exc:
        return str(explain(exc))
    if len(plan.steps) > input.max_steps:
        return f"the plan has {len(plan.steps)} steps; at most {input.max_steps} are allowed"
    problem = validate(plan, names)
    if problem:
        return problem
    for step in plan.steps:
        info = infos.get(step.skill or "")
        if info is not None and info.input_type is not None:
            try:
                msgspec.convert(step.input, info.input_type, strict=False)
            except msgspec.ValidationError as exc:
                return f"step {step.id!r}: input for {step.skill}: {explain(exc)}"
    return ""
