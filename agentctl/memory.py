"""``agentctl memory``, ``agentctl checkpoint`` and ``agentctl shared``: agent memory as events.

Reads ask the projector (or a local file with ``--db``); writes are events sent through
the router, so they are checked, audited and reproduced by a replay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.tree import Tree

from ledgerbus.agentctl.common import App, out, run
from ledgerbus.agentctl.reads import ask, db_option, id_column, json_option
from ledgerbus.agentctl.send import send_and_report
from ledgerbus.bus.events import (
    CheckpointRestored,
    CheckpointSaved,
    MemoryWiped,
    MemoryWritten,
    SharedWritten,
    new_id,
)


def _json_value(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a bare word is a string: `memory set a1 city Paris`


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _entries(parent: Tree, title: str, entries: list[dict[str, Any]], last: int) -> None:
    branch = parent.add(f"{title} [dim]({len(entries)})[/]")
    if len(entries) > last:
        branch.add(f"[dim]… {len(entries) - last} earlier (--last to see more)[/]")
    for e in entries[-last:]:
        if e.get("summary"):
            branch.add(f"[dim]#{e['n']} summary: {e['rolled']} earlier entries, "
                       f"seq {e['first_seq']}..{e['seq']} ({e['first_at'][:19]} .. {e['at'][:19]})[/]")
        else:
            branch.add(f"#{e['n']} [dim]{e['at'][11:19]} seq {e['seq']}[/] {_short(e['value'])}")


@click.group()
def memory() -> None:
    """Show, change and wipe an agent's memory."""


@memory.command("show")
@click.argument("agent")
@click.option("--last", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many of the newest observations and reasoning steps to show.")
@db_option
@json_option
@click.pass_obj
def memory_show(app: App, agent: str, last: int, db_path: Path | None, as_json: bool) -> None:
    """Show AGENT's role, knowledge, observations, reasoning and current task."""
    mem = run(lambda: ask(app, "memory", "get", {"agent": agent}, db_path))
    if as_json:
        out.print_json(data=mem)
        return
    if mem["updated_seq"] is None:
        out.print(f"[dim]nothing in {agent}'s memory[/]")
        return
    tree = Tree(f"[bold]{agent}[/] [dim](memory as of seq {mem['updated_seq']})[/]")
    tree.add(f"role: {_short(mem['role']) if mem['role'] is not None else '[dim]none[/]'}")
    tree.add(f"current task: {mem['current_task'] or '[dim]none[/]'}")
    if mem["restored_from"]:
        tree.add(f"[dim]restored from checkpoint {mem['restored_from']}[/]")
    if mem["wiped_seq"]:
        tree.add(f"[dim]last wiped at seq {mem['wiped_seq']}[/]")
    know = tree.add(f"knowledge [dim]({len(mem['knowledge'])})[/]")
    for key, k in mem["knowledge"].items():
        know.add(f"{key}{' [yellow](core)[/]' if k['core'] else ''} = {_short(k['value'])}")
    _entries(tree, "observations", mem["observations"], last)
    _entries(tree, "reasoning", mem["reasoning"], last)
    out.print(tree)


@memory.command("set")
@click.argument("agent")
@click.argument("key")
@click.argument("value", callback=_json_value)
@click.option("--core", is_flag=True, help="Core knowledge: kept by a wipe.")
@json_option
@click.pass_obj
def memory_set(app: App, agent: str, key: str, value: Any, core: bool, as_json: bool) -> None:
    """Set knowledge KEY of AGENT to VALUE (JSON, or a bare string)."""
    event = MemoryWritten(id=new_id(), agent=agent, section="knowledge", key=key, value=value, core=core)
    send_and_report(app, event, agent, as_json, lambda _: f"{agent} knows {key}")


@memory.command("role")
@click.argument("agent")
@click.argument("role", callback=_json_value)
@json_option
@click.pass_obj
def memory_role(app: App, agent: str, role: Any, as_json: bool) -> None:
    """Set AGENT's role (kept by a wipe)."""
    event = MemoryWritten(id=new_id(), agent=agent, section="role", value=role)
    send_and_report(app, event, agent, as_json, lambda _: f"{agent}'s role is set")


@memory.command("wipe")
@click.argument("agent")
@click.option("--reason", default="", help="Recorded with the wipe.")
@json_option
@click.pass_obj
def memory_wipe(app: App, agent: str, reason: str, as_json: bool) -> None:
    """Clear AGENT's current task, observations, reasoning and non-core knowledge.
    Its role and core knowledge stay."""
    event = MemoryWiped(id=new_id(), agent=agent, reason=reason)
    send_and_report(app, event, agent, as_json, lambda _: f"wiped {agent}'s memory (role and core knowledge kept)")


@click.group()
def checkpoint() -> None:
    """Save, list and restore checkpoints of an agent's memory."""


@checkpoint.command("save")
@click.argument("agent")
@click.option("--label", default="", help="A name for people.")
@click.option("--id", "checkpoint_id", help="The checkpoint id (default: a random one).")
@json_option
@click.pass_obj
def checkpoint_save(app: App, agent: str, label: str, checkpoint_id: str | None, as_json: bool) -> None:
    """Checkpoint AGENT's memory as it is now; prints the id to restore."""
    event = CheckpointSaved(id=new_id(), agent=agent, checkpoint_id=checkpoint_id or new_id()[:12], label=label)
    send_and_report(app, event, agent, as_json,
                    lambda r: f"saved checkpoint {event.checkpoint_id} of {agent} at seq {r.seq}")


@checkpoint.command("list")
@click.argument("agent")
@db_option
@json_option
@click.pass_obj
def checkpoint_list(app: App, agent: str, db_path: Path | None, as_json: bool) -> None:
    """List AGENT's checkpoints, oldest first."""
    rows = run(lambda: ask(app, "checkpoints", "list", {"agent": agent}, db_path))
    if as_json:
        out.print_json(data=rows)
        return
    table = Table(box=None)
    id_column(table, "id", rows, key="checkpoint_id")
    for name in ("label", "seq", "saved at", "by", "knowledge", "entries", "state", "restored"):
        table.add_column(name)
    for r in rows:
        table.add_row(r["checkpoint_id"], r["label"], str(r["seq"]), r["at"][:19], r["saved_by"], str(r["knowledge"]),
                      str(r["entries"]), "yes" if r["state"] is not None else "", str(r["restores"] or ""))
    out.print(table if rows else f"[dim]no checkpoints of {agent}[/]")


@checkpoint.command("restore")
@click.argument("agent")
@click.argument("checkpoint_id")
@json_option
@click.pass_obj
def checkpoint_restore(app: App, agent: str, checkpoint_id: str, as_json: bool) -> None:
    """Make AGENT's memory what it was at CHECKPOINT_ID."""
    event = CheckpointRestored(id=new_id(), agent=agent, checkpoint_id=checkpoint_id)
    send_and_report(app, event, agent, as_json, lambda _: f"restored {agent}'s memory to checkpoint {checkpoint_id}")


@click.group()
def shared() -> None:
    """Read and write the context agents share."""


@shared.command("list")
@click.argument("namespace")
@db_option
@json_option
@click.pass_obj
def shared_list(app: App, namespace: str, db_path: Path | None, as_json: bool) -> None:
    """List NAMESPACE's live keys."""
    rows = run(lambda: ask(app, "shared", "list", {"namespace": namespace}, db_path))
    if as_json:
        out.print_json(data=rows)
        return
    table = Table("key", "value", "written by", "at", "expires", box=None)
    for r in rows:
        table.add_row(r["key"], _short(r["value"], 60), r["written_by"], r["written_at"][:19],
                      (r["expires_at"] or "")[:19])
    out.print(table if rows else f"[dim]nothing shared in {namespace}[/]")


@shared.command("set")
@click.argument("namespace")
@click.argument("key")
@click.argument("value", callback=_json_value)
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=0, min_open=True), help="Expire after this many seconds.")
@json_option
@click.pass_obj
def shared_set(app: App, namespace: str, key: str, value: Any, ttl_s: float | None, as_json: bool) -> None:
    """Set KEY of NAMESPACE to VALUE (JSON, or a bare string)."""
    event = SharedWritten(id=new_id(), namespace=namespace, key=key, value=value, ttl_s=ttl_s)
    send_and_report(app, event, namespace, as_json, lambda _: f"set {namespace}/{key}")
