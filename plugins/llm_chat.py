"""``llm.chat``: one chat completion through the agent's LLM router (``ctx.llm``).

The input is a prompt (or a conversation), and optionally a system prompt and a JSON
schema for structured output. Role pipelines and handoffs give it a ``requirement``
with the role's ``instructions`` and ``guardrails`` instead: the role's instructions (not
the serving agent's profile's, unless it is that role) become the system prompt, with the
guardrails as rules under it, and the call takes the role's model route. The outputs of
the steps this one depends on (plan context) or the handed-off ``context`` follow the
prompt, each under its own heading, within ``CONTEXT_CHARS`` (the oldest summarised). An
answer that breaks the role's ``checks`` fails the task (:mod:`agents.guardrails`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec

from ledgerbus.agents import guardrails
from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.guardrails import Checks
from ledgerbus.agents.llm.base import ChatRequest, Message, ProviderError
from ledgerbus.agents.llm.router import LLM
from ledgerbus.agents.skill import InputError, SkillContext

_Text = Annotated[str, msgspec.Meta(max_length=200_000)]


class ChatInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A prompt or a conversation; or a role's requirement (from a pipeline or a handoff)."""

    prompt: _Text = ""
    messages: list[Message] = msgspec.field(default_factory=list)
    system: _Text = ""
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=200_000)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    schema: dict[str, Any] | None = None
    """a JSON schema: the answer is structured output matching it (``data`` in the output)"""
    requirement: _Text = ""
    role: str = ""
    instructions: _Text = ""
    guardrails: list[str] = msgspec.field(default_factory=list)
    handoffs: list[str] = msgspec.field(default_factory=list)
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    """what a handoff carried over"""
    sender: str = msgspec.field(default="", name="from")
    """who handed off (a handoff's ``from``)"""
    context_chars: Annotated[int, msgspec.Meta(ge=200, le=1_000_000)] | None = None
    """how much of the earlier steps' outputs goes into the prompt (default ``CONTEXT_CHARS``)"""
    checks: Checks | None = None
    """the role's guardrails a machine checks on the answer (:mod:`agents.guardrails`): an
    answer that breaks them fails the task, with the problems as its error"""


class ChatOutput(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer and what it cost."""

    text: str
    data: Any = None
    provider: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0


def system_prompt(ctx: SkillContext, inp: ChatInput) -> str:
    """The profile's instructions, the input's instructions and system prompt, then the rules.

    A step that plays a role (``inp.role``) speaks with that role's instructions only: the
    serving agent's own profile is left out unless it is that role, so a role never runs
    with another role's prompt, whichever agent serves it."""
    own = ctx.instructions if not inp.role or inp.role == ctx.role else ""
    parts = [p for p in dict.fromkeys((own, inp.instructions, inp.system)) if p]
    if inp.guardrails:
        parts.append("Rules you must keep:\n" + "\n".join(f"- {g}" for g in inp.guardrails))
    return "\n\n".join(parts)


def _render(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]  # another llm.chat's answer: its text, not its bookkeeping
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


CONTEXT_CHARS = 48_000
"""At most about this many characters of earlier steps' outputs go into a prompt (a
pipeline's memory of every earlier role): the newest whole, the oldest summarised."""
SUMMARY_SHARE = 4
"""The summary of the oldest outputs gets a ``1/SUMMARY_SHARE`` of the context budget."""


async def bounded_context(ctx: SkillContext, budget: int = CONTEXT_CHARS,
                          llm: LLM | None = None) -> list[tuple[str, str]]:
    """Each earlier step's output as text, in order, within about ``budget`` characters:
    the newest kept whole while they fit in three quarters of it; the older ones summarised
    together by the model (one call on this task's route, counted in its usage) into the
    rest, under the heading ``summary of ...``. If that call fails, the older ones are cut
    to their beginnings instead, the cut marked, and the log says why."""
    rendered = [(step, _render(output)) for step, output in ctx.context.items()]
    if sum(len(text) for _, text in rendered) <= budget:
        return rendered
    keep, room = len(rendered), budget - budget // SUMMARY_SHARE
    while keep > 0 and len(rendered[keep - 1][1]) <= room:
        keep -= 1
        room -= len(rendered[keep][1])
    older, newer = rendered[:keep], rendered[keep:]
    if not newer and older:  # the newest alone is too long: it is what the older ones get cut for
        older, newer = older[:-1], [(older[-1][0], _cut(older[-1][1], budget - budget // SUMMARY_SHARE))]
    if not older:
        return newer
    share = max(budget // SUMMARY_SHARE, 200)
    names = ", ".join(step for step, _ in older)
    text = "\n\n".join(f"## Output of {step}\n{body}" for step, body in older)
    try:
        llm = llm or ctx.require_llm()
        summary = (await llm.chat(ChatRequest(
            system="You summarise the earlier outputs of a multi-agent pipeline for the next role: keep every "
                   "decision, requirement, name, interface and open question; drop the rest.",
            messages=[Message(role="user", content=f"Summarise in at most {share // 5} words:\n\n{text}")],
            max_tokens=max(share // 3, 64)))).text.strip()
    except (ProviderError, SkillError) as exc:
        ctx.log.warning("context_summary_failed", steps=names, error=str(exc))
        per = max(share // len(older), 1)
        return [(step, _cut(body, per)) for step, body in older] + newer
    return [(f"summary of {names}", _cut(summary, share)), *newer]


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} of {len(text)} characters left out: the prompt's context budget]"


async def user_prompt(ctx: SkillContext, inp: ChatInput, llm: LLM | None = None) -> str:
    """The prompt (or requirement), then each input it builds on under its own heading
    (``llm``: what summarises the oldest of them when they are too long together)."""
    head = inp.prompt or inp.requirement
    parts = [head] if head else []
    if inp.requirement and inp.prompt:
        parts.append(f"## Requirement\n{inp.requirement}")
    for step, text in await bounded_context(ctx, inp.context_chars or CONTEXT_CHARS, llm):
        title = step[0].upper() + step[1:] if step.startswith("summary of ") else f"Output of {step}"
        parts.append(f"## {title}\n{text}")
    if inp.context:
        parts.append(f"## Handed over by {inp.sender or 'another agent'}\n{_render(inp.context)}")
    return "\n\n".join(parts)


class ChatSkill:
    """One completion through ``ctx.llm``, routed by skill and role (llm.toml)."""

    name = "llm.chat"
    description = "One LLM chat completion (prompt or messages; optional JSON schema) through the routing file."
    uses_workspace = False
    """No files, no commands: its attempts get no workspace directory."""
    capabilities = ("llm", "chat", "writing")
    uses_llm = True  # the agent imports the LLM SDKs ahead, in the background
    input_type = ChatInput
    output_type = ChatOutput

    async def run(self, ctx: SkillContext, input: ChatInput) -> ChatOutput:
        """Build the request, call the model, report what came back."""
        llm = ctx.llm
        if llm is not None and input.role and input.role != ctx.role:
            llm = llm.as_role(input.role)  # a pipeline step plays its role's route, on any agent
        messages = list(input.messages)
        prompt = await user_prompt(ctx, input, llm)
        if prompt:
            messages.append(Message(role="user", content=prompt))
        if not messages or messages[-1].role != "user":
            raise InputError("llm.chat needs a prompt, a requirement, or messages ending with a user turn")
        request = ChatRequest(messages=messages, system=system_prompt(ctx, input), max_tokens=input.max_tokens,
                              temperature=input.temperature, schema=input.schema)
        if llm is None:
            llm = ctx.require_llm()  # raises, saying the agent has no routing file
        try:
            result = await llm.chat(request)
        except ProviderError as exc:
            raise SkillError(str(exc)) from exc
        problems = await guardrails.check(ctx, result.text, input.guardrails, input.checks)
        if problems:
            raise SkillError(f"the {input.role or 'answer'}'s guardrails are not kept: " + "; ".join(problems))
        return ChatOutput(text=result.text, data=result.data, provider=result.provider, model=result.model,
                          tokens_in=result.tokens_in, tokens_out=result.tokens_out)
