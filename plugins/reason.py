"""``reason``: the Observe → Reason → Plan → Act → Validate loop, on the agent's LLM route.

Each iteration asks the model for one structured answer per phase (each phase has its
own msgspec type, so its JSON schema and its check are one thing):

- **observe**: what is known now (the goal, what earlier iterations did and learned);
- **reason**: what that means and what is still missing;
- **plan**: the actions to take (at most ``max_actions``), each a skill and its input;
- **act**: each action runs as a delegated subtask (``ctx.delegate``), its output or
  error recorded; no model call;
- **validate**: whether the goal is met, the answer if so, a progress estimate (0–1)
  and feedback for the next iteration if not.

Every phase's output is written to the agent's reasoning history (``ctx.memory.reason``:
a ``memory_written`` event, so the audit log holds the whole trace of thought). The loop
ends when validation passes, or fails after ``max_iterations``. When progress has not
risen for ``stuck_after`` iterations the agent is stuck: its working memory is wiped
(``memory_wiped``) and the loop starts over once, with fresh reasoning and the rest of
its iterations; stuck a second time, it fails saying so.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from ledgerbus.agents import guardrails
from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.guardrails import Checks
from ledgerbus.agents.llm.base import ChatRequest, Message, ProviderError
from ledgerbus.agents.llm.schema import for_type
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus.problems import explain
from ledgerbus.bus.subjects import SKILL_PATTERN

Phase = Literal["observe", "reason", "plan", "act", "validate"]


class Observation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Observe: the facts that matter for the goal, as of now."""

    facts: list[str]


class Thought(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reason: what the facts mean, and what is still missing to reach the goal."""

    analysis: str
    missing: list[str] = msgspec.field(default_factory=list)


class Action(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One thing to do: run ``skill`` on ``input``."""

    skill: Annotated[str, msgspec.Meta(pattern=SKILL_PATTERN)]
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    why: str = ""


class Steps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Plan: the actions of this iteration (none, if the answer can be given now)."""

    actions: Annotated[list[Action], msgspec.Meta(max_length=8)]


class Verdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Validate: is the goal met? ``answer`` when it is; ``feedback`` when not."""

    done: bool
    progress: Annotated[float, msgspec.Meta(ge=0, le=1)]
    answer: Any = None
    feedback: str = ""


PHASES: dict[str, type[msgspec.Struct]] = {
    "observe": Observation, "reason": Thought, "plan": Steps, "validate": Verdict,
}

INSTRUCTIONS = {
    "observe": "Observe: list the facts that matter for the goal, including what the actions so far returned.",
    "reason": "Reason: analyse the facts; say what is still missing to reach the goal.",
    "plan": "Plan: choose the actions (skills and inputs) that get what is missing; none if the answer is ready. "
            "Available skills: {skills}.",
    "validate": "Validate: given everything above, is the goal met? If so give the answer; if not, estimate "
                "progress (0-1) and say what the next iteration should do differently.",
}


LOOP_SYSTEM = ("You reason step by step towards the goal, one phase at a time, answering only through the "
               "structured output.")


class ReasonInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The goal, the skills the loop may act with, and its bounds."""

    goal: Annotated[str, msgspec.Meta(min_length=1, max_length=20_000)]
    skills: list[str] = msgspec.field(default_factory=list)
    """skills Act may delegate to (default: none, so the loop only thinks)"""
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=50)] = 5
    stuck_after: Annotated[int, msgspec.Meta(ge=1, le=50)] = 2
    """iterations without progress after which the agent counts as stuck"""
    max_actions: Annotated[int, msgspec.Meta(ge=0, le=8)] = 4
    guardrails: list[Annotated[str, msgspec.Meta(max_length=4096)]] = msgspec.field(default_factory=list)
    """rules the answer keeps (in words, for the validator)"""
    checks: Checks | None = None
    """the gate Validate's answer must pass (:mod:`agents.guardrails`), as a role's output does"""


class ReasonOutput(msgspec.Struct, frozen=True, kw_only=True):
    """The answer, and how it was reached."""

    answer: Any
    iterations: int
    restarts: int
    progress: float


class Loop:
    """One run of the loop: the working memory (what this run has seen), and its phases."""

    def __init__(self, ctx: SkillContext, goal: ReasonInput) -> None:
        self.ctx = ctx
        self.goal = goal
        self.working: list[dict[str, Any]] = []
        """this run's phases so far, fed back to the model (wiped when stuck)"""

    async def record(self, iteration: int, phase: Phase, output: Any) -> None:
        """Keep the phase's output in working memory and in the agent's reasoning history."""
        entry = {"iteration": iteration, "phase": phase, "output": msgspec.to_builtins(output)}
        self.working.append(entry)
        await self.ctx.memory.reason({"task_id": self.ctx.task_id, **entry})

    async def ask(self, iteration: int, phase: Phase) -> Any:
        """One phase's structured answer from the model, checked against its type."""
        kind = PHASES[phase]
        prompt = "\n\n".join([
            f"Goal:\n{self.goal.goal}",
            "Working memory (this run so far):\n" + (json.dumps(self.working, indent=1, ensure_ascii=False)
                                                     if self.working else "(empty)"),
            INSTRUCTIONS[phase].format(skills=", ".join(self.goal.skills) or "none"),
        ])
        system = "\n\n".join(p for p in (self.ctx.instructions, LOOP_SYSTEM) if p)
        try:
            result = await self.ctx.require_llm().chat(ChatRequest(
                messages=[Message(role="user", content=prompt)], system=system,
                schema=for_type(kind), schema_name=phase))
        except ProviderError as exc:
            raise SkillError(f"{phase} (iteration {iteration}): {exc}") from exc
        try:
            return msgspec.convert(result.data, kind)
        except msgspec.ValidationError as exc:
            raise SkillError(f"{phase} (iteration {iteration}): the model's answer does not match the schema: "
                             f"{explain(exc)}") from exc

    async def act(self, steps: Steps) -> list[dict[str, Any]]:
        """Run each planned action as a delegated subtask; an action that fails is a result too."""
        results: list[dict[str, Any]] = []
        for action in steps.actions[: self.goal.max_actions]:
            if action.skill not in self.goal.skills:
                results.append({"skill": action.skill, "error": f"not one of the allowed skills: {self.goal.skills}"})
                continue
            try:
                results.append({"skill": action.skill, "output": await self.ctx.delegate(action.skill, action.input)})
            except SkillError as exc:
                results.append({"skill": action.skill, "error": str(exc)})
        return results


def stuck(progress: list[float], after: int) -> bool:
    """Whether the last ``after`` iterations brought no progress over the best before them
    (or, with fewer behind them, over nothing: a loop at 0 for ``after`` iterations)."""
    if len(progress) < after:
        return False
    before = max(progress[:-after], default=0.0)
    return max(progress[-after:]) <= before


class ReasonSkill:
    """Observe → Reason → Plan → Act → Validate until the goal is met, bounded and unstuck."""

    name = "reason"
    description = "Reach a goal by Observe/Reason/Plan/Act/Validate iterations (LLM), acting through other skills."
    uses_workspace = False
    """No files, no commands: its attempts get no workspace directory."""
    capabilities = ("reasoning", "problem-solving")
    uses_llm = True  # the agent imports the LLM SDKs ahead, in the background
    input_type = ReasonInput
    output_type = ReasonOutput

    async def run(self, ctx: SkillContext, input: ReasonInput) -> ReasonOutput:
        """Iterate; wipe and start over once when stuck."""
        loop, restarts, last = Loop(ctx, input), 0, ""
        progress: list[float] = []
        for iteration in range(1, input.max_iterations + 1):
            await ctx.progress(f"iteration {iteration}", (iteration - 1) / input.max_iterations)
            await loop.record(iteration, "observe", await loop.ask(iteration, "observe"))
            await loop.record(iteration, "reason", await loop.ask(iteration, "reason"))
            steps = await loop.ask(iteration, "plan")
            await loop.record(iteration, "plan", steps)
            await loop.record(iteration, "act", await loop.act(steps))
            verdict: Verdict = await loop.ask(iteration, "validate")
            if verdict.done:
                # The model's "done" passes the same gate as a role's output before it counts.
                text = verdict.answer if isinstance(verdict.answer, str) else json.dumps(verdict.answer)
                problems = await guardrails.check(ctx, text, input.guardrails, input.checks)
                if problems:
                    verdict = msgspec.structs.replace(
                        verdict, done=False, feedback="the answer breaks its guardrails: " + "; ".join(problems))
            await loop.record(iteration, "validate", verdict)
            if verdict.done:
                return ReasonOutput(answer=verdict.answer, iterations=iteration, restarts=restarts,
                                    progress=verdict.progress)
            last = verdict.feedback
            progress.append(verdict.progress)
            if stuck(progress, input.stuck_after):
                if restarts:
                    raise SkillError(f"stuck again: no progress over {input.stuck_after} iterations after a fresh "
                                     f"start (iteration {iteration}); last feedback: {last}")
                restarts, progress = 1, []
                await ctx.memory.wipe(reason=f"reason: stuck at iteration {iteration} of task {ctx.task_id}")
                ctx.log.info("reason_restarted", iteration=iteration)
                loop = Loop(ctx, input)
        raise SkillError(f"goal not met after {input.max_iterations} iterations; last feedback: {last}")
