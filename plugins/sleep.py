"""``sleep``: waits ``seconds`` while reporting progress. Stands in for long work in tests."""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec

from ledgerbus.agents.skill import SkillContext


class SleepInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How long to sleep."""

    seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400, description="seconds to sleep")] = 1.0


class SleepOutput(msgspec.Struct, frozen=True):
    """How long it slept."""

    slept: float


class SleepSkill:
    """Sleep for ``seconds`` (default 1), reporting progress about once a second."""

    name = "sleep"
    description = "Sleep for `seconds`, reporting progress; returns how long it slept."
    uses_workspace = False
    """No files, no commands: its attempts get no workspace directory."""
    capabilities = ("wait", "timer")
    """What plan steps naming capabilities may ask of it (the router matches on these)."""
    input_type = SleepInput
    output_type = SleepOutput

    async def run(self, ctx: SkillContext, input: SleepInput) -> SleepOutput:
        """Sleep in steps of at most a second so progress is visible."""
        seconds = input.seconds
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (left := seconds - (loop.time() - start)) > 0:
            await asyncio.sleep(min(1.0, left))
            done = min(1.0, (loop.time() - start) / seconds) if seconds else 1.0
            await ctx.progress(f"slept {loop.time() - start:.1f}s of {seconds}s", done)
        return SleepOutput(slept=seconds)
