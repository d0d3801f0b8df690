"""Guardrails checked on what a role produces, not only written into its prompt.

A profile's ``guardrails`` are rules in words, handed to the model. Its ``checks`` are the
part a machine can hold the output to::

    [profiles.qa.checks]
    must_include = ["acceptance criteria"]      # each must appear (case-insensitive)
    must_not_include = ["TODO"]                 # none may appear (case-insensitive)
    must_not_match = ['(?i)api[_-]?key\\s*[:=]']  # no match of these regular expressions
    max_chars = 20000                           # the output's length at most
    validator = "llm.chat"                      # optional: a skill asked whether the output
                                                # keeps the guardrails (answers {ok, problems})

:func:`check` runs the rules, then the validator (a subtask, so it is in the log and the
task's tree). ``llm.chat`` fails a step whose output breaks them with the problems as its
error, so the step's retry policy runs it again or the pipeline stops there, with the
reason in the log; ``reason``'s Validate phase holds its answer to the same checks.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

if TYPE_CHECKING:
    from ledgerbus.agents.skill import SkillContext

_Phrase = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class Checks(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The machine-checkable guardrails of a role (see the module docstring)."""

    must_include: Annotated[list[_Phrase], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    must_not_include: Annotated[list[_Phrase], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    must_not_match: Annotated[list[_Phrase], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    max_chars: Annotated[int, msgspec.Meta(ge=1)] | None = None
    validator: Annotated[str, msgspec.Meta(max_length=128)] = ""

    def __post_init__(self) -> None:
        for pattern in self.must_not_match:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"must_not_match {pattern!r} is not a regular expression: {exc}") from exc


VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "problems": {"type": "array", "items": {"type": "string"}}},
    "required": ["ok", "problems"],
}
"""What a validator skill is asked to answer (as structured output)."""


def broken_rules(text: str, checks: Checks) -> list[str]:
    """The rules of ``checks`` that ``text`` breaks, each said in words (none: it keeps them)."""
    problems: list[str] = []
    lower = text.lower()
    problems += [f"the output does not contain {p!r}" for p in checks.must_include if p.lower() not in lower]
    problems += [f"the output contains {p!r}" for p in checks.must_not_include if p.lower() in lower]
    for pattern in checks.must_not_match:
        if (m := re.search(pattern, text)) is not None:
            problems.append(f"the output matches {pattern!r} (at {m.start()}: {m.group(0)[:40]!r})")
    if checks.max_chars is not None and len(text) > checks.max_chars:
        problems.append(f"the output is {len(text)} characters, more than {checks.max_chars}")
    return problems


async def check(ctx: SkillContext, text: str, guardrails: list[str], checks: Checks | None) -> list[str]:
    """Everything ``text`` does wrong: the rules first, then (if they pass and a validator is
    configured) the validator's judgement against the guardrails in words."""
    if checks is None:
        return []
    problems = broken_rules(text, checks)
    if problems or not checks.validator:
        return problems
    rules = "\n".join(f"- {g}" for g in guardrails) or "- (none in words: judge it for plain mistakes)"
    prompt = (f"Does the output below keep every one of these rules?\n{rules}\n\n## Output\n{text}\n\n"
              "Answer ok=true with no problems if it does; otherwise ok=false and one short sentence per "
              "problem.")
    answer = await ctx.delegate(checks.validator, {"prompt": prompt, "schema": VERDICT_SCHEMA})
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        return [f"the validator {checks.validator} gave no verdict: {json.dumps(answer)[:200]}"]
    if data["ok"]:
        return []
    found = [str(p) for p in data.get("problems") or []] or ["(no reason given)"]
    return [f"the validator {checks.validator}: {p}" for p in found]
