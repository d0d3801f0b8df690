"""Shell completion of skill names and task ids (click's completion, docs in the README).

Completing must be quick and silent: skill names come from the installed entry points
(nothing is imported), task ids from one query of the projector with a one-second budget;
when the bus is not there, nothing is offered rather than an error.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points

import click
from click.shell_completion import CompletionItem

from ledgerbus.bus.errors import LedgerbusError

QUERY_BUDGET_S = 1.0


def skill_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The installed skills whose name starts with ``incomplete``."""
    names = sorted({ep.name for ep in entry_points(group="ledgerbus.skills")})
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def task_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Task ids starting with ``incomplete`` (the newest twenty when it is empty)."""
    from ledgerbus.agentctl.common import App, open_bus
    from ledgerbus.bus.settings import Settings

    app = ctx.find_object(App)
    if app is None:
        try:
            app = App(Settings.from_env(), "console", "error")
        except LedgerbusError:
            return []
    app = App(app.settings.replace(connect_timeout_s=QUERY_BUDGET_S), app.log_format, app.log_level)

    async def ask() -> list[CompletionItem]:
        async with open_bus(app) as bus:
            if incomplete:
                ids = await bus.query("tasks", "resolve", {"prefix": incomplete, "limit": 50})
                return [CompletionItem(i) for i in ids]
            page = await bus.list(limit=20)
            return [CompletionItem(r["task_id"], help=f"{r['skill']} {r['status']}") for r in page.items]

    async def bounded() -> list[CompletionItem]:
        return await asyncio.wait_for(ask(), QUERY_BUDGET_S * 2)

    try:
        return asyncio.run(bounded())
    except Exception:  # noqa: BLE001 - completion never fails loudly: no bus, no projector, a slow answer
        return []
