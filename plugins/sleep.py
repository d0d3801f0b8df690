"""``sleep``: waits ``seconds`` while reporting progress. Stands in for long work in tests."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.errors import SkillError
from agents.skill import SkillContext


class SleepSkill:
    """Sleep for ``input["seconds"]`` (default 1), reporting progress about once a second."""

    name = "sleep"
    description = "Sleep for `seconds`, reporting progress; returns how long it slept."
    capabilities = ("wait", "timer")
    """What plan steps naming capabilities may ask of it (the router matches on these)."""

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        """Sleep in steps of at most a second so progress is visible."""
        seconds = input.get("seconds", 1.0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 86_400:
            raise SkillError(f"input.seconds must be a number from 0 to 86400, got {seconds!r}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (left := seconds - (loop.time() - start)) > 0:
            await asyncio.sleep(min(1.0, left))
            done = min(1.0, (loop.time() - start) / seconds) if seconds else 1.0
            await ctx.progress(f"slept {loop.time() - start:.1f}s of {seconds}s", done)
        return {"slept": seconds}
