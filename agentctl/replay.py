"""``agentctl replay``: rebuild every projection from the log into a new file, as of now, a
sequence, or a moment; from the newest projection snapshot that fits, from a snapshot
file, or from sequence 1."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ledgerbus.agentctl.common import EXIT_FAILED, App, cli_principal, err, fail, out, run
from ledgerbus.bus.archive import ArchiveError, configured
from ledgerbus.bus.connection import connected
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.errors import LogGapError
from ledgerbus.projections.rebuild import rebuild, rebuild_from_store
from ledgerbus.projections.rebuild import snapshot as take_snapshot


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r} (e.g. 2026-11-21T06:15:40Z)") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@click.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The new database file to write (must not exist).")
@click.option("--until-seq", type=click.IntRange(min=1), help="Stop after this audit sequence.")
@click.option("--until", "until_time", callback=_moment, metavar="ISO-TIME",
              help="Stop after the last record made at or before this time (UTC if no zone).")
@click.option("--from-snapshot", "snapshot_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Start from this snapshot file (agentctl snapshot) and apply only the records after it.")
@click.option("--full", is_flag=True, help="Fold from audit sequence 1, not from a projection snapshot.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def replay(app: App, db_path: Path, until_seq: int | None, until_time: datetime | None, snapshot_path: Path | None,
           full: bool, as_json: bool) -> None:
    """Rebuild every projection into a new file: the state now, or as it was at --until-seq N
    or --until TIME. At the log's head it equals the live projection.

    It starts from the newest projection snapshot the projectors saved that checks and is
    at or before the target, and applies only the records after it (it says which); from
    audit sequence 1 with --full, or when there is none."""
    if db_path.exists():
        raise click.BadParameter(f"{db_path} exists: replay writes a new file", param_hint="--db")
    if full and snapshot_path is not None:
        raise click.UsageError("--full and --from-snapshot: choose one")
    show = not as_json and err.is_terminal

    async def body() -> tuple[str | None, int, int, dict[str, int]]:
        start, used = 0, None
        if snapshot_path is not None:
            snap = await dbmod.open_reader(snapshot_path)
            try:
                start = await dbmod.position(snap)
            finally:
                await snap.close()
            used = str(snapshot_path)
        async with connected(app.settings, cli_principal()) as nc:
            js = nc.jetstream(timeout=10)
            bar = Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           console=err, transient=True) if show else None
            with bar if bar is not None else nullcontext():
                task = bar.add_task("replay", total=None) if bar is not None else None

                def progress(done: int, total: int) -> None:
                    if bar is not None and task is not None:
                        bar.update(task, completed=done, total=total)

                cap, archive = app.settings.memory_list_cap, configured(app.settings)[0]
                try:
                    if full or snapshot_path is not None:
                        position = await rebuild(js, db_path, until_seq=until_seq, until_time=until_time,
                                                 on_progress=progress, memory_list_cap=cap, from_snapshot=snapshot_path,
                                                 archive=archive)
                    else:
                        restored, position = await rebuild_from_store(
                            js, db_path, until_seq=until_seq, until_time=until_time, on_progress=progress,
                            memory_list_cap=cap, archive=archive)
                        if restored is not None:
                            start, used = restored.position, restored.name
                except ValueError as exc:
                    raise click.UsageError(str(exc)) from exc
                except (ArchiveError, LogGapError) as exc:
                    fail(str(exc), EXIT_FAILED)
        db = await dbmod.open_db(db_path)
        try:
            rows = await dbmod.row_counts(db)
        finally:
            await db.close()
        return used, start, position, rows

    snapshot_used, start, position, rows = run(body)
    if as_json:
        out.print_json(data={"db": str(db_path), "snapshot": snapshot_used, "from_seq": start + 1, "position": position,
                             "rows": rows})
    else:
        counts = ", ".join(f"{n} {t}" for t, n in rows.items() if t not in ("tracking", "meta"))
        source = f"snapshot {snapshot_used} (seq {start}) + seq {start + 1}" if snapshot_used else "seq 1"
        out.print(f"replayed audit {source}..{position} into {db_path} ({counts})")


@click.command()
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--db", "db_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The projection database to copy. [default: LEDGERBUS_DB_PATH]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def snapshot(app: App, out_path: Path, db_path: Path | None, as_json: bool) -> None:
    """Write a compacted copy of the projection database, tracking row included, to OUT.

    Safe while the projector runs. `agentctl replay --from-snapshot OUT` then applies only
    the records after it."""
    source = db_path or app.settings.db_path
    if out_path.exists():
        raise click.BadParameter(f"{out_path} exists: a snapshot writes a new file", param_hint="OUT")

    async def body() -> int:
        return await take_snapshot(source, out_path)

    position = run(body)
    size = out_path.stat().st_size
    if as_json:
        out.print_json(data={"snapshot": str(out_path), "source": str(source), "position": position, "bytes": size})
    else:
        out.print(f"snapshot of {source} at seq {position} written to {out_path} ({size / 1024:.0f} KiB)")
