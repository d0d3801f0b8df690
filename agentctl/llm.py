"""``agentctl llm``: recorded LLM calls, one shown whole, or a run's calls exported to a file
that a ``replay`` provider answers from (docs/replay.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ledgerbus.agentctl.common import App, open_bus, out, run
from ledgerbus.agentctl.complete import task_ids
from ledgerbus.bus import codec


@click.group()
def llm() -> None:
    """Recorded LLM calls: every answered `ctx.llm` call's request and answer, by hash."""


@llm.command("show")
@click.argument("call")
@click.option("--json", "as_json", is_flag=True, help="Print the recorded call as JSON.")
@click.pass_obj
def show(app: App, call: str, as_json: bool) -> None:
    """Show one recorded call: CALL is its hash, or a unique prefix of at least 8 hex digits
    (`agentctl usage --calls` lists them). Its body is checked against the hash."""

    async def body() -> tuple[str, Any, list[dict[str, Any]]]:
        async with open_bus(app) as bus:
            name, record = await bus.llm_call(call)
            reports = await bus.query("usage", "list", {"call": name, "limit": 20})
            return name, record, reports

    name, record, reports = run(body)
    if as_json:
        out.print_json(data={"call": name, "record": codec.to_builtins(record), "reported_by": reports})
        return
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("call", f"{name} [green](sha256 matches)[/]")
    head.add_row("task", f"{record.task_id} attempt {record.attempt}, call {record.n}"
                 + (f", at {record.path}" if record.path else ""))
    head.add_row("skill", record.skill + (f" as {record.role}" if record.role else "")
                 + (f" on {record.agent}" if record.agent else ""))
    model = f"{record.provider}/{record.model}, max_tokens {record.max_tokens}"
    if record.request.temperature is not None:
        model += f", temperature {record.request.temperature:g}"
    head.add_row("model", model + (f", params {json.dumps(record.params)}" if record.params else ""))
    head.add_row("at", f"{record.at.isoformat(timespec='seconds')}, {record.latency_s:.2f}s")
    head.add_row("request", record.request_hash)
    if record.redacted:
        head.add_row("redacted", ", ".join(record.redacted))
    if record.truncated:
        head.add_row("truncated", f"[yellow]the {record.truncated} was over the record cap and was dropped[/]")
    for r in reports:
        head.add_row("reported", f"audit seq {r['seq']}: {r['outcome']} for task {r['task_id']} by {r['agent']}")
    turns: list[Any] = [head]
    if record.request.system:
        turns.append(Panel(Text(record.request.system), title="system", title_align="left", border_style="dim"))
    for message in record.request.messages:
        turns.append(Panel(Text(message.content), title=message.role, title_align="left", border_style="dim"))
    if record.request.schema is not None:
        turns.append(Panel(Text(json.dumps(record.request.schema, indent=2)),
                           title=f"schema {record.request.schema_name}", title_align="left", border_style="dim"))
    if record.answer is None:
        turns.append(Text("no answer kept (over the record cap)", style="yellow"))
    else:
        a = record.answer
        shown = json.dumps(a.data, indent=2) if a.data is not None else a.text
        turns.append(Panel(Text(shown), title=f"answer ({a.stop_reason or 'end'}, {a.tokens_in} in, {a.tokens_out} out)",
                           title_align="left", border_style="green"))
    out.print(Group(*turns))


@llm.command("export")
@click.argument("task_id", shell_complete=task_ids)
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The recording file to write (JSON lines, one recorded call each; `-` for stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.pass_obj
def export(app: App, task_id: str, out_path: Path, as_json: bool) -> None:
    """Write the recorded calls of TASK_ID and everything under it to a recording file, for a
    `type = "replay"` provider in llm.toml (docs/replay.md). Each line is a call's stored
    bytes, so its hash can be checked."""

    async def body() -> tuple[str, list[bytes]]:
        from ledgerbus.agents.llm import calls

        async with open_bus(app) as bus:
            root = await bus.resolve(task_id)
            rows = await bus.query("usage", "list", {"task_id": root, "tree": True, "limit": 10_000})
            js = bus.nc.jetstream(timeout=10)
            names = list(dict.fromkeys(r["call"] for r in rows if r.get("call")))
            return root, [await calls.fetch_bytes(js, name) for name in names]

    root, lines = run(body)
    data = b"".join(line + b"\n" for line in lines)
    if str(out_path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        out_path.write_bytes(data)
    if as_json:
        out.print_json(data={"task_id": root, "calls": len(lines), "file": str(out_path)})
    elif str(out_path) != "-":
        out.print(f"{len(lines)} recorded calls of task {root} written to {out_path}")
