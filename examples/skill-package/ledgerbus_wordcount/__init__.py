"""``wordcount``: count the words of a text, the most frequent first.

A complete third-party skill: typed input and output (so a bad input is rejected with
its path before the skill runs), progress, a file in the task's workspace, and a hook.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Annotated, Any

import msgspec

from ledgerbus.agents.hooks import Veto
from ledgerbus.agents.skill import SkillContext


class Text(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What to count."""

    text: Annotated[str, msgspec.Meta(max_length=1_000_000)]
    top: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    """how many of the most frequent words to return"""


class Counts(msgspec.Struct, frozen=True):
    """How many words, how many distinct, and the most frequent."""

    words: int
    distinct: int
    top: list[tuple[str, int]]


class WordCountSkill:
    """Counts words (letters and digits, case-folded)."""

    name = "wordcount"
    description = "Count the words of `text`; return the total, the distinct count and the `top` most frequent."
    capabilities = ("text", "counting")
    input_type = Text
    output_type = Counts

    async def run(self, ctx: SkillContext, input: Text) -> Counts:
        """Count, leave the full table in ``output/counts.tsv``, return the summary."""
        words = [w.casefold() for w in re.findall(r"\w+", input.text)]
        counts = Counter(words)
        await ctx.progress(f"counted {len(words)} words", 1.0)
        table = "".join(f"{word}\t{n}\n" for word, n in counts.most_common())
        (ctx.output_dir() / "counts.tsv").write_text(table)
        return Counts(words=len(words), distinct=len(counts), top=counts.most_common(input.top))


class TrimHook:
    """Strips surrounding whitespace from the text before ``wordcount`` runs, and refuses
    an empty text (a veto: the task fails with the reason, and the skill never runs)."""

    name = "wordcount-trim"
    skills = ("wordcount",)

    async def before(self, ctx: SkillContext, input: Any) -> Any:
        text = input.get("text") if isinstance(input, dict) else None
        if isinstance(text, str):
            if not text.strip():
                raise Veto("there is nothing to count")
            return {**input, "text": text.strip()}
        return input
