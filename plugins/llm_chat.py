"""``llm.chat``: one chat completion through the agent's LLM router (``ctx.llm``).

The input is a prompt (or a conversation), and optionally a system prompt and a JSON
schema for structured output. Role pipelines and handoffs give it a ``requirement``
with the role's ``instructions`` and ``guardrails`` instead: the role's instructions (not
the serving agent's profile's, unless it is that role) become the system prompt, and its
model route is the role's, the
guardrails rules under it, and the outputs of the steps this one depends on (plan
context) or the handed-off ``context`` follow the prompt, each under its own heading.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec

from agents import guardrails
from agents.errors import SkillError
from agents.guardrails import Checks
from agents.llm.base import ChatRequest, Message, ProviderError
from agents.skill import InputError, SkillContext

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
"""At most this many characters of earlier steps' outputs go into a prompt (a pipeline's
memory of every earlier role): the newest in full first; the oldest are shortened, the cut
marked, when the whole would pass it."""


def bounded_context(context: dict[str, Any], budget: int = CONTEXT_CHARS) -> list[tuple[str, str]]:
    """Each earlier step's output as text, in order, within ``budget`` characters together:
    newer outputs are kept whole first, older ones keep their beginning and say what was cut."""
    kept: list[tuple[str, str]] = []
    for step, output in reversed(list(context.items())):
        text = _render(output)
        if len(text) > budget:
            cut = len(text) - budget
            text = text[:budget] + f"\n[... {cut} of {len(text)} characters left out: the prompt's context budget]"
            budget = 0
        else:
            budget -= len(text)
        kept.append((step, text))
    return kept[::-1]


def user_prompt(ctx: SkillContext, inp: ChatInput) -> str:
    """The prompt (or requirement), then each input it builds on under its own heading."""
    head = inp.prompt or inp.requirement
    parts = [head] if head else []
    if inp.requirement and inp.prompt:
        parts.append(f"## Requirement\n{inp.requirement}")
    for step, text in bounded_context(ctx.context):
        parts.append(f"## Output of {step}\n{text}")
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
    input_type = ChatInput
    output_type = ChatOutput

    async def run(self, ctx: SkillContext, input: ChatInput) -> ChatOutput:
        """Build the request, call the model, report what came back."""
        messages = list(input.messages)
        prompt = user_prompt(ctx, input)
        if prompt:
            messages.append(Message(role="user", content=prompt))
        if not messages or messages[-1].role != "user":
            raise InputError("llm.chat needs a prompt, a requirement, or messages ending with a user turn")
        request = ChatRequest(messages=messages, system=system_prompt(ctx, input), max_tokens=input.max_tokens,
                              temperature=input.temperature, schema=input.schema)
        llm = ctx.require_llm()
        if input.role and input.role != ctx.role:
            llm = llm.as_role(input.role)  # a pipeline step plays its role's route, on any agent
        try:
            result = await llm.chat(request)
        except ProviderError as exc:
            raise SkillError(str(exc)) from exc
        problems = await guardrails.check(ctx, result.text, input.guardrails, input.checks)
        if problems:
            raise SkillError(f"the {input.role or 'answer'}'s guardrails are not kept: " + "; ".join(problems))
        return ChatOutput(text=result.text, data=result.data, provider=result.provider, model=result.model,
                          tokens_in=result.tokens_in, tokens_out=result.tokens_out)
