"""``agentctl approvals``, ``approve`` and ``deny``: see and decide on tasks held for approval."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ledgerbus.agentctl.common import App, open_bus, out, run
from ledgerbus.agentctl.complete import task_ids
from ledgerbus.agentctl.reads import db_option, id_column, json_option
from ledgerbus.agentctl.send import send_and_report
from ledgerbus.bus.records import AuditRecord
from ledgerbus.client import Bus


def _decide(app: App, verb: str, task_id: str, reason: str, as_json: bool) -> None:
    def decide(bus: Bus) -> Awaitable[AuditRecord]:
        return bus.approve(task_id, reason) if verb == "approved" else bus.deny(task_id, reason)

    send_and_report(app, decide, task_id, as_json, lambda record: f"{verb} task {record.key}")


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@click.option("--reason", default="", help="Recorded with the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print the router's audit record as JSON.")
@click.pass_obj
def approve(app: App, task_id: str, reason: str, as_json: bool) -> None:
    """Let TASK_ID, held for approval, run. Exit 0 when the router accepts the approval."""
    _decide(app, "approved", task_id, reason, as_json)


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@click.option("--reason", default="", help="Recorded with the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print the router's audit record as JSON.")
@click.pass_obj
def deny(app: App, task_id: str, reason: str, as_json: bool) -> None:
    """Refuse TASK_ID, held for approval: it never runs. Exit 0 when the router accepts."""
    _decide(app, "denied", task_id, reason, as_json)


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Decided ones too, not only those waiting.")
@db_option
@json_option
@click.pass_obj
def approvals(app: App, show_all: bool, db_path: Path | None, as_json: bool) -> None:
    """List tasks held for approval, oldest first."""
    async def body() -> list[dict[str, Any]]:
        async with open_bus(app, db_path) as bus:
            return await bus.approvals(pending_only=not show_all)

    rows = run(body)
    if as_json:
        out.print_json(data=rows)
        return
    table = Table(box=None)
    id_column(table, "task", rows)
    for name in ("skill", "submitted by", "requested", "status", "decided by", "reason"):
        table.add_column(name)
    for r in rows:
        table.add_row(r["task_id"], r["skill"], r["submitted_by"], r["requested_at"][:19], r["status"],
                      r["decided_by"] or "", r["reason"] or "")
    out.print(table if rows else "[dim]nothing waits for approval[/]")
