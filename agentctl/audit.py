"""``agentctl audit verify``: is the log intact, and do the projections follow from it?"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ledgerbus.agentctl.common import EXIT_FAILED, EXIT_OK, App, cli_principal, err, out, run
from ledgerbus.agentctl.reads import json_option
from ledgerbus.bus import anchor, signing
from ledgerbus.bus.connection import connected
from ledgerbus.bus.verify import Finding, LogReport
from ledgerbus.projections import integrity


@click.group()
def audit() -> None:
    """The audit log."""


@audit.command()
@click.option("--db", "db_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Compare this projection file with a rebuild (default: ask the projector).")
@click.option("--no-projections", is_flag=True, help="Check only the log, not the projections.")
@click.option("--pubkey", type=click.Path(dir_okay=False, path_type=Path),
              help="The router's public key (default: next to LEDGERBUS_ROUTER_KEY_PATH, .pub).")
@click.option("--anchor", "anchor_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A copy of the chain's anchor to compare the log with (default: next to "
                   "LEDGERBUS_ROUTER_KEY_PATH, .anchor, if it is there), besides the chain bucket.")
@json_option
@click.pass_obj
def verify(app: App, db_path: Path | None, no_projections: bool, pubkey: Path | None, anchor_path: Path | None,
           as_json: bool) -> None:
    """Verify the audit log: the stream is append-only, its sequences run from 1 with none
    missing, every record's hash recomputes and links to the one before, the router's signed
    checkpoints are valid and regular, the stream still holds the last checkpoint anchored
    outside it (no restarted chain), records that left the stream are in the archive (sealed,
    unchanged, chained into the stream, their leaving recorded), and a projection rebuilt
    from scratch equals the live one. Exit 0 when intact, 1 naming the first bad sequence and what is wrong."""
    show = not as_json and err.is_terminal
    key_file = pubkey or signing.public_path(app.settings.router_key_path)
    anchor_file = anchor_path or anchor.file_path(app.settings.router_key_path)
    max_gap = app.settings.checkpoint_every + app.settings.router_batch

    bar = Progress(TextColumn("verifying the chain"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=err, transient=True) if show else None

    async def body() -> tuple[LogReport, list[Finding]]:
        public_key = signing.load_public(key_file) if (pubkey is not None or key_file.exists()) else None
        async with connected(app.settings, cli_principal()) as nc:
            with bar if bar is not None else nullcontext():
                task = bar.add_task("chain", total=None) if bar is not None else None

                def progress(done: int, total: int) -> None:
                    if bar is not None and task is not None:
                        bar.update(task, completed=done, total=total)

                return await integrity.check(nc, public_key=public_key, max_gap=max_gap, anchor_file=anchor_file,
                                             anchor_required=anchor_path is not None, projections=not no_projections,
                                             db_path=db_path, progress=progress, settings=app.settings)

    report, findings = run(body)
    ok = all(f.ok for f in findings)
    bad = next((f for f in findings if not f.ok), None)
    if as_json:
        out.print_json(data=integrity.as_json(report, findings))
    else:
        table = Table("check", "", "detail", box=None)
        for f in findings:
            table.add_row(f.check, "[green]ok[/]" if f.ok else "[red]FAILED[/]", f.detail)
        out.print(table)
        if ok:
            out.print(f"[green]intact[/]: {report.head.seq} records, head {report.head.hash}")
        else:
            assert bad is not None
            where = f"first bad seq {bad.seq}: " if bad.seq else ""
            err.print(f"[red]not intact[/]: {where}{bad.check}: {bad.detail}")
    sys.exit(EXIT_OK if ok else EXIT_FAILED)
