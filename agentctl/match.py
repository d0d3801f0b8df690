"""``agentctl match``: where a step would go, before it is submitted.

It asks the same function the router's scheduler assigns work with
(:func:`router.scheduler.fits`), over the live heartbeats: every agent whose skill
provides what the step needs, with its score (``|needed| / |provided|``: 1 is an exact
fit, a broader skill scores lower) and its free slots. The router sends the step to the
first one; a step no live agent fits waits as ``unmatched``, with a proposal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import msgspec
from rich.table import Table

from ledgerbus.agentctl.common import EXIT_FAILED, App, fail, open_bus, out, run
from ledgerbus.agentctl.complete import skill_names
from ledgerbus.agentctl.reads import json_option
from ledgerbus.bus.messages import Heartbeat
from ledgerbus.router.live import LiveAgents, fits


def _csv(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@click.command("match")
@click.argument("skill", required=False, shell_complete=skill_names)
@click.option("--capabilities", callback=_csv, metavar="A,B",
              help="The capabilities the step needs (as a plan step's `capabilities`).")
@json_option
@click.pass_obj
def match(app: App, skill: str | None, capabilities: list[str], as_json: bool) -> None:
    """Show the live agents a step needing CAPABILITIES (or SKILL) would be sent to, best
    first, with their scores: the router assigns it to the first."""
    if not skill and not capabilities:
        raise click.UsageError("give the SKILL a step names, or the --capabilities it needs, or both")
    need = capabilities or [skill or ""]

    async def body() -> list[dict[str, Any]]:
        async with open_bus(app) as bus:
            return await bus.heartbeats()

    live = LiveAgents(app.settings.agents_ttl_s)
    load: dict[str, int] = {}
    for raw in run(body):
        try:
            beat = msgspec.convert(raw, Heartbeat, strict=False)
        except msgspec.ValidationError:
            continue  # written by another version: the router skips it too
        live.put(f"{beat.agent}.{beat.instance}", beat)
        load[beat.agent] = load.get(beat.agent, 0) + beat.load
    live.expire(datetime.now(UTC))
    found = fits(need, live.pools(), lambda agent: load.get(agent, 0), skill)
    rows: list[dict[str, Any]] = [{"agent": f.agent, "skill": f.skill, "score": round(f.score, 4), "provides": sorted(f.provided),
             "free": max(f.free, 0), "slots": f.slots} for f in found]
    if not rows:
        fail(f"no live agent provides {', '.join(need)}" + (f" with the skill {skill}" if skill else "")
             + ": a step that needs it waits as unmatched, with a proposal (agentctl agents propose)", EXIT_FAILED)
    if as_json:
        out.print_json(data={"needs": need, "skill": skill, "candidates": rows})
        return
    table = Table("", "agent", "skill", "score", "provides", "free slots", box=None)
    for i, r in enumerate(rows):
        table.add_row("→" if i == 0 else "", r["agent"], r["skill"], f"{r['score']:g}", ", ".join(r["provides"]),
                      f"{r['free']}/{r['slots']}")
    out.print(table)
