"""``agentctl fork``: a new run of a task tree from a log position (docs/replay.md)."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.tree import Tree

from ledgerbus.agentctl.common import EXIT_FAILED, EXIT_OK, App, err, open_bus, out, projected, run
from ledgerbus.agentctl.complete import task_ids
from ledgerbus.bus.lifecycle import Status


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@click.option("--at", "at_seq", required=True, type=click.IntRange(min=1), metavar="SEQ",
              help="The log position to fork from (`agentctl tasks show ID` lists the task's records).")
@click.option("--live", is_flag=True,
              help="Replay the LLM calls recorded up to SEQ, and send the later ones to the model "
                   "(default: replay throughout, and fail a call the recording has no answer for).")
@click.option("--strict", is_flag=True,
              help="Answer a call only from a recorded call with the same request hash (default: else the "
                   "call with the same number in the task at the same place of the tree).")
@click.option("--wait", is_flag=True, help="Wait for the fork to finish; exit 1 if it fails.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="With --wait: seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the fork as JSON.")
@click.pass_obj
def fork(app: App, task_id: str, at_seq: int, live: bool, strict: bool, wait: bool, timeout: float,
         as_json: bool) -> None:
    """Start a new run of TASK_ID's tree as it stood at log position SEQ.

    The tasks that had completed by SEQ keep their outputs; the others run again under new
    ids, their LLM calls answered from the recordings of the original run; the memory of the
    agents that ran its tasks is restored to SEQ (each gets a checkpoint of its memory now
    first). Everything is recorded (`run_forked`), and the original run is not touched:
    `agentctl tasks show TASK_ID` shows the fork as a branch."""

    async def body() -> tuple[Any, dict[str, Any] | None]:
        async with open_bus(app) as bus:
            made, handle = await bus.fork(task_id, at_seq=at_seq, live=live, match="strict" if strict else "lenient")
            done = None
            if wait:
                # The log says how it ended; the projection, a batch behind, has the details.
                outcome = await handle.wait(timeout=timeout)
                done = await projected(bus, made.task_id, outcome.status)
            return made, done

    made, done = run(body)
    summary = {
        "task_id": made.task_id, "source_task_id": made.source_task_id, "at_seq": made.at_seq,
        "recording": made.recording, "calls": len(made.manifest.calls), "live": live,
        "kept": [n.task_id for n in made.nodes if n.kept],
        "rerun": [{"task_id": n.task_id, "path": n.path} for n in made.nodes if not n.kept],
        "memory_restored": made.forked.restored, "memory_not_restored": made.skipped_memory,
    }
    failed = done is not None and done["status"] != Status.COMPLETED
    if done is not None:
        summary.update(status=done["status"], output=done.get("output"), error=done.get("error"))
    if as_json:
        out.print_json(data=summary)
        sys.exit(EXIT_FAILED if failed else EXIT_OK)
    tree = Tree(f"[bold]{made.task_id}[/] forked from [bold]{made.source_task_id}[/] at seq {made.at_seq}")
    mode = "replayed up to the fork point, then live" if live else "replayed throughout"
    tree.add(f"LLM calls: {len(made.manifest.calls)} recorded, {mode} (recording {made.recording[:12]})")
    for n in made.nodes:
        mark = "[green]kept[/]" if n.kept else "[yellow]runs again[/]"
        tree.add(f"{n.path} {mark} [dim]({n.task_id}, {n.status} at seq {made.at_seq})[/]")
    if made.forked.restored:
        tree.add("memory restored to seq {}: {}".format(made.at_seq, ", ".join(made.forked.restored)))
    for agent, why in made.skipped_memory.items():
        tree.add(f"[yellow]memory of {agent} not restored: {why}[/]")
    if done is not None:
        tree.add(f"finished: {done['status']}" + (f" [red]{done.get('error')}[/]" if failed else ""))
    out.print(tree)
    if done is None:
        err.print(f"[dim]agentctl tasks show {made.task_id}[/]")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)
