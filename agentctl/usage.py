"""``agentctl usage``: what LLM calls cost, per provider and model, or call by call."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ledgerbus.agentctl.common import App, err, out, run
from ledgerbus.agentctl.complete import task_ids
from ledgerbus.agentctl.reads import ask, db_option, id_column, json_option


@click.command()
@click.option("--task", "task_id", shell_complete=task_ids, help="Only this task and everything under it (plan steps, subtasks).")
@click.option("--calls", is_flag=True, help="List the calls themselves, newest first, instead of totals.")
@click.option("--agent", help="With --calls: only this agent's calls.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="With --calls.")
@db_option
@json_option
@click.pass_obj
def usage(app: App, task_id: str | None, calls: bool, agent: str | None, limit: int, db_path: Path | None,
          as_json: bool) -> None:
    """Show LLM usage: calls, failures, tokens, cost and latency per provider and model;
    with --calls, each call, with the hash of its recording (`agentctl llm show CALL`)."""
    if calls:
        rows = run(lambda: ask(app, "usage", "list", {"task_id": task_id, "agent": agent, "limit": limit}, db_path))
        if as_json:
            out.print_json(data=rows)
            return
        table = Table("at", box=None)
        id_column(table, "task", rows)
        for name in ("agent", "provider", "model", "in", "out", "cost $", "latency", "outcome"):
            table.add_column(name)
        table.add_column("call", no_wrap=True)
        for r in rows:
            outcome = r["outcome"] if r["outcome"] in ("ok", "replayed") else f"[red]{r['outcome']}[/]"
            table.add_row(r["at"][:19], r["task_id"], r["agent"], r["provider"], r["model"], str(r["tokens_in"]),
                          str(r["tokens_out"]), f"{r['cost_usd']:.4f}", f"{r['latency_s']:.2f}s", outcome,
                          r["call"][:12])
        out.print(table if rows else "[dim]no LLM calls[/]")
        if any(r["call"] for r in rows):
            err.print("[dim]agentctl llm show CALL: a call's request and answer[/]")
        return
    rows = run(lambda: ask(app, "usage", "summary", {"task_id": task_id}, db_path))
    if as_json:
        out.print_json(data=rows)
        return
    table = Table("provider", "model", "calls", "failed", "tokens in", "tokens out", "cost $", "mean latency",
                  "max latency", box=None)
    for r in rows:
        table.add_row(r["provider"], r["model"], str(r["calls"]), str(r["failed"]) if r["failed"] else "",
                      str(r["tokens_in"]), str(r["tokens_out"]), f"{r['cost_usd']:.4f}", f"{r['mean_latency_s']:.2f}s",
                      f"{r['max_latency_s']:.2f}s")
    out.print(table if rows else "[dim]no LLM calls[/]")
