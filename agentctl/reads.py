"""Read commands: ``tasks``, ``tasks show``, ``events``, ``agents``.

By default they ask the projector over NATS (so they work from any machine that reaches
the bus); ``--db PATH`` reads a local projection file instead. ``--json`` is for scripts.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.tree import Tree

from ledgerbus.agentctl.common import EXIT_FAILED, EXIT_OK, App, err, open_bus, out, run
from ledgerbus.agentctl.complete import task_ids
from ledgerbus.agentctl.proposals import propose
from ledgerbus.bus.lifecycle import Status
from ledgerbus.client import Page
from ledgerbus.projections.errors import DatabaseError

STATUS_STYLE: dict[str, str] = {
    Status.SUBMITTED: "white", Status.AWAITING_APPROVAL: "magenta", Status.WAITING: "dim",
    Status.UNMATCHED: "magenta", Status.PENDING: "yellow", Status.RUNNING: "cyan", Status.RETRYING: "yellow",
    Status.COMPLETED: "green", Status.FAILED: "red", Status.DENIED: "red", Status.CANCELLED: "red",
    Status.SKIPPED: "dim", Status.DEAD_LETTERED: "red", Status.REJECTED: "red",
    "online": "green", "offline": "dim", "lost": "red",
}
"""How each task status (and agent state) is drawn; every :class:`Status` has one."""
TASK_STATUSES = tuple(s.value for s in Status if s not in (Status.SUBMITTED, Status.REJECTED))
"""The statuses a task row can have (``tasks --status``)."""

db_option = click.option(
    "--db", "db_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Read this projection database file instead of asking the projector.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


async def ask(app: App, projection: str, op: str, request: dict[str, Any], db_path: Path | None) -> Any:
    """One query, to the projector over NATS or, with ``db_path``, to a local database file.

    Both go through the query service's own ``answer``, so they cannot disagree.
    """
    try:
        async with open_bus(app, db_path) as bus:
            return await bus.query(projection, op, request)
    except sqlite3.Error as exc:
        raise DatabaseError(f"reading {db_path}: {exc}") from exc


def _styled(status: str | None) -> str:
    status = status or ""
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _duration(start: str | None, end: str | None) -> str:
    if not start or not end:
        return ""
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


@click.group(invoke_without_command=True)
@click.option("--status", type=click.Choice(TASK_STATUSES), help="Only these (dead_lettered: the dead letters).")
@click.option("--skill", help="Only tasks of this skill.")
@click.option("--agent", help="Only tasks this agent ran.")
@click.option("--by", "submitted_by", metavar="PRINCIPAL", help="Only tasks this principal submitted (cli-NAME, ...).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--before", type=click.IntRange(min=1), metavar="SEQ",
              help="The next page: tasks submitted before this log position (printed under a full page).")
@db_option
@json_option
@click.pass_context
def tasks(ctx: click.Context, status: str | None, skill: str | None, agent: str | None, submitted_by: str | None,
          limit: int, before: int | None, db_path: Path | None, as_json: bool) -> None:
    """List tasks, newest first (`tasks show ID` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    app: App = ctx.obj

    async def body() -> Page:
        async with open_bus(app, db_path) as bus:
            return await bus.list(status=status, skill=skill, agent=agent, submitted_by=submitted_by, limit=limit,
                                  before=before)

    page = run(body)
    if as_json:
        out.print_json(data=page.items)
        return
    table = Table(box=None)
    id_column(table, "task", page.items)
    for name in ("skill", "status", "agent", "attempts", "took", "submitted by"):
        table.add_column(name)
    for r in page.items:
        table.add_row(r["task_id"], r["skill"], _styled(r["status"]), r["agent"] or "", str(r["attempts"]),
                      _duration(r["submitted_at"], r["finished_at"]), r["submitted_by"])
    out.print(table if page.items else "[dim]no tasks[/]")
    if page.next is not None:
        err.print(f"[dim]more: agentctl tasks --before {page.next}[/]")


def id_column(table: Table, header: str, rows: list[dict[str, Any]], key: str = "task_id") -> None:
    """A column of ids that is never cut or wrapped, however narrow the terminal: an id is
    for copying (the other columns give way instead)."""
    widest = max((len(str(r.get(key) or "")) for r in rows), default=len(header))
    table.add_column(header, no_wrap=True, min_width=max(widest, len(header)), overflow="ignore")


@tasks.command("show")
@click.argument("task_id", shell_complete=task_ids)
@db_option
@json_option
@click.pass_obj
def tasks_show(app: App, task_id: str, db_path: Path | None, as_json: bool) -> None:
    """Show one task (TASK_ID or a unique prefix of one), and (when connected) its history
    in the audit log. Exit 1 when it failed or was rejected, 2 for an id nobody knows."""

    async def body() -> dict[str, Any]:
        async with open_bus(app, db_path) as bus:
            return await bus.get(task_id, tree=True, history=db_path is None)

    task = run(body)
    history = task.pop("history", [])
    failed = task["status"] in (Status.FAILED, Status.REJECTED, Status.DEAD_LETTERED, Status.DENIED, Status.CANCELLED)
    if as_json:
        out.print_json(data={**task, "history": history})
        sys.exit(EXIT_FAILED if failed else EXIT_OK)
    tree = Tree(f"[bold]{task['task_id']}[/] {task['skill']} {_styled(task['status'])}")
    for key in ("agent", "attempts", "dispatches", "submitted_by", "submitted_at", "started_at", "finished_at",
                "retry_at", "trace_id"):
        if task.get(key) not in (None, "", 0):
            tree.add(f"{key}: {task[key]}")
    if task["status"] == Status.REJECTED:
        tree.add(f"[red]rejected ({task['code']}): {task['reason']}[/]")
    if task.get("kind") != "plan":
        tree.add(f"input: {json.dumps(task['input'])}")
    if task["status"] == Status.COMPLETED:
        tree.add(f"output: {json.dumps(task['output'])}")
    if task.get("error") and task["status"] != Status.REJECTED:
        tree.add(f"[red]error: {task['error']}[/]")
    if origin := task.get("forked_from"):
        how = "live after it" if origin["live"] else "replayed"
        tree.add(f"[magenta]forked from {origin['source_task_id']} at seq {origin['at_seq']}[/] by "
                 f"{origin['forked_by']} (LLM calls {how}, recording {origin['recording'][:12]})")
    if task.get("children"):
        _subtree(tree.add("[bold]subtasks[/]"), task["children"])
    if task.get("forks"):
        branches = tree.add("[bold magenta]forks[/]")
        for f in task["forks"]:
            branches.add(f"[magenta]⑂ {f['task_id']}[/] from seq {f['at_seq']}, by {f['forked_by']} at "
                         f"{f['forked_at'][:19]} ({len(json.loads(f['kept']))} kept)")
    if history:
        log = tree.add("audit log")
        for h in history:
            mark = "" if h["verdict"] == "accepted" else f" [red]rejected ({h['code']}): {h['reason']}[/]"
            log.add(f"#{h['seq']} {h['at']} {h['kind']} by {h['principal']}{_detail(h)}{mark}")
    out.print(tree)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _detail(record: dict[str, Any]) -> str:
    """What a history line adds for the records whose fields matter at a glance: where a
    dispatch went and why (the match's score), why a task waits or was cancelled."""
    event = record.get("event") or {}
    if record["kind"] == "task_dispatched":
        where = f"to {event['agent']}" if event.get("agent") else f"to any agent with {event.get('skill')}"
        score = f", score {event['score']:g}" if event.get("score") is not None else ""
        return f": {where} ({event.get('reason', 'ready')}{score})"
    if record["kind"] == "handoff":
        return f": from {event.get('from_role') or '?'} ({event.get('from_task')}) to {event.get('to_role') or '?'}"
    if record["kind"] == "skill_unmatched":
        return f": no live agent provides {', '.join(event.get('capabilities', []))}"
    if record["kind"] == "task_cancelled" and event.get("reason"):
        return f": {event['reason']}"
    return ""


def task_line(task: dict[str, Any]) -> str:
    """One task as a tree node: step (or id), skill, state, agent, attempts, time, note."""
    name = task.get("step") or task["task_id"]
    skill = task["skill"] or "needs " + ",".join(task.get("needs") or [])
    parts = [f"[bold]{name}[/]", skill, _styled(task["status"])]
    if task.get("agent"):
        parts.append(f"on {task['agent']}")
    if task.get("attempts", 0) > 1:
        parts.append(f"[yellow]{task['attempts']} attempts[/]")
    if took := _duration(task.get("started_at"), task.get("finished_at")):
        parts.append(took)
    note = task.get("error") if task["status"] != Status.COMPLETED else None
    note = note or task.get("progress")
    if note:
        parts.append(f"[dim]{note[:80]}[/]")
    return " ".join(parts)


def _subtree(node: Tree, children: list[dict[str, Any]]) -> None:
    for child in children:
        _subtree(node.add(task_line(child)), child.get("children") or [])


@click.command()
@click.option("--task", "task_id", shell_complete=task_ids, help="Only this task's records.")
@click.option("--from-seq", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records as they are appended.")
@json_option
@click.pass_obj
def events(app: App, task_id: str | None, from_seq: int, follow: bool, as_json: bool) -> None:
    """Print the audit log (one stored record per line with --json)."""

    async def body() -> None:
        async with open_bus(app) as bus:
            async for record, data in bus.stored(task_id, from_seq=from_seq, follow=follow):
                if as_json:
                    click.echo(data.decode())  # the stored bytes, exactly as they were hashed
                    continue
                verdict = "[green]ok[/]" if record.accepted else f"[red]{record.code}[/]"
                detail = f"  [dim]{record.reason}[/]" if record.reason else ""
                out.print(f"{record.seq:>6}  {record.at:%H:%M:%S.%f}"[:-3] + f"  {verdict:<18} {record.kind:<15} "
                          f"{record.key:<24} {record.principal}{detail}")

    run(body)


@click.group(invoke_without_command=True)
@db_option
@json_option
@click.pass_context
def agents(ctx: click.Context, db_path: Path | None, as_json: bool) -> None:
    """List agents: who joined with which skills, and live heartbeats (`agents propose`
    for the agents the router proposes)."""
    if ctx.invoked_subcommand is not None:
        return
    app: App = ctx.obj

    async def body() -> list[dict[str, Any]]:
        async with open_bus(app, db_path) as bus:
            return await bus.agents()

    rows = run(body)
    if as_json:
        out.print_json(data=rows)
        return
    table = Table("agent", "status", "skills", "replicas", "load", "done", "failed", "last heartbeat", box=None)
    now = datetime.now(UTC)
    for r in rows:
        beat = r.get("last_heartbeat")
        age = f"{(now - datetime.fromisoformat(beat)).total_seconds():.0f}s ago" if beat else ""
        table.add_row(r["name"], _styled(r["status"]), ",".join(r["skills"]), str(r.get("replicas", "")),
                      str(r.get("load", "")), str(r["tasks_completed"]), str(r["tasks_failed"]), age)
    out.print(table if rows else "[dim]no agents[/]")


agents.add_command(propose)
