"""What a skill is given for one attempt at a task: its :class:`SkillContext`.

The context's ways out (progress, usage, memory, shared notes, subtasks, a hand-off, the
LLM) all report through the attempt's claim: nothing the skill sends counts before the
claim is accepted, so each waits for it (``agents/claim.py``). The budget the LLM sees is
what the work item carried, less what this attempt has reported spending.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Tracer

from ledgerbus.agents import profiles, workspace
from ledgerbus.agents.claim import AttemptClaim
from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.llm.router import CallSite
from ledgerbus.agents.memory import Memory, Shared, Tasks, Writer
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus import codec
from ledgerbus.bus.events import Budget, Event, TaskProgress, TaskUsage, new_id
from ledgerbus.bus.messages import WorkItem

if TYPE_CHECKING:
    from pathlib import Path

    from ledgerbus.agents.llm.base import Usage
    from ledgerbus.agents.runtime import Agent


def skill_context(agent: Agent, skill_name: str, item: WorkItem, attempt: int, claim: AttemptClaim, tlog: Any,
                  place: Path | None, tracer: Tracer) -> SkillContext:
    """The context of attempt ``attempt`` at ``item``, run by ``agent`` with the skill
    ``skill_name``, in the workspace ``place`` (``None``: the skill uses none)."""

    async def report(event: Event, headers: dict[str, str] | None = None) -> None:
        # Nothing the skill sends counts before its claim: the claim goes first.
        if not await claim.send():
            raise SkillError(f"the claim on task {item.task_id} was refused: its reports do not count")
        await agent.report(event, headers)

    async def progress(message: str, fraction: float | None) -> None:
        await report(
            TaskProgress(id=new_id(), task_id=item.task_id, attempt=attempt, message=message[:16_384], fraction=fraction)
        )

    spent = [0, 0.0]  # tokens and cost this attempt reported: what is left is checked against it

    def budget_left() -> tuple[Budget | None, str]:
        left = item.budget_left
        if left is None:
            return None, ""
        return Budget(tokens=None if left.tokens is None else left.tokens - int(spent[0]),
                      cost_usd=None if left.cost_usd is None else left.cost_usd - spent[1]), item.budget_owner

    async def usage(tokens_in: int, tokens_out: int, cost_usd: float, provider: str, model: str,
                    latency_s: float = 0.0, outcome: str = "ok", call: str = "") -> None:
        spent[0] += tokens_in + tokens_out
        spent[1] += cost_usd
        await report(TaskUsage(id=new_id(), task_id=item.task_id, attempt=attempt, tokens_in=tokens_in,
                                    tokens_out=tokens_out, cost_usd=cost_usd, provider=provider[:64],
                                    model=model[:128], latency_s=max(latency_s, 0.0), outcome=outcome[:32],
                                    call=call))

    async def llm_usage(u: Usage) -> None:
        await usage(u.tokens_in, u.tokens_out, u.cost_usd, u.provider, u.model, u.latency_s, u.outcome, u.call)

    writer = Writer(agent.nc, report)
    replay = item.replay
    recording = (lambda: agent._recording(replay.recording)) if replay is not None else None
    tasks = Tasks(writer, item.task_id, path=item.path, replay=replay, recording=recording)
    site = CallSite(task_id=item.task_id, attempt=attempt, path=item.path, agent=agent.name, store=agent._store_call,
                    max_bytes=agent.settings.llm_record_max_bytes, replay=recording,
                    match=replay.match if replay is not None else "lenient",
                    live=replay.live if replay is not None else False)

    async def handoff(role: str, context: dict[str, Any]) -> str:
        if agent.profile:
            allowed = profiles.get(agent.settings.profiles_path, agent.profile).handoffs
            if role not in allowed:
                raise SkillError(f"profile {agent.profile} may hand off to {', '.join(allowed) or 'nobody'}, not {role}")
        target = profiles.get(agent.settings.profiles_path, role)
        if not target.skills:
            raise SkillError(f"profile {role} has no skill to hand off to")
        payload = {"context": context, "role": role, "instructions": target.instructions,
                   "guardrails": target.guardrails, "from": agent.name,
                   **({"checks": codec.to_builtins(target.checks)} if target.checks is not None else {})}
        return await tasks.submit(target.skills[0], payload, timeout_s=item.timeout_s, handoff=True)

    return SkillContext(
        task_id=item.task_id,
        skill=skill_name,
        attempt=attempt,
        agent=agent.name,
        deadline=asyncio.get_running_loop().time() + item.timeout_s,
        log=tlog,
        memory=Memory(writer, agent.name),
        shared=Shared(writer),
        tasks=tasks,
        _handoff=handoff,
        context=item.context,
        parent_task_id=item.parent_task_id,
        step=item.step,
        _progress=progress,
        _usage=usage,
        workspace=place or workspace.NONE,
        role=agent.profile,
        instructions=agent.instructions,
        llm=(agent.llm.bind(skill_name, role=agent.profile, usage=llm_usage, budget=budget_left, site=site)
             if agent.llm is not None else None),
        tracer=tracer,
    )
