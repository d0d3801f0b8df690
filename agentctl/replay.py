"""``agentctl replay``: rebuild every projection from the log into a new file, as of now, a
sequence, or a moment."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from agentctl.common import App, cli_principal, err, out, run
from bus.connection import connected
from projections import db as dbmod
from projections.rebuild import rebuild


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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def replay(app: App, db_path: Path, until_seq: int | None, until_time: datetime | None, as_json: bool) -> None:
    """Rebuild every projection from audit sequence 1 into a new file: the state now, or as it
    was at --until-seq N or --until TIME. At the log's head it equals the live projection."""
    if db_path.exists():
        raise click.BadParameter(f"{db_path} exists: replay writes a new file", param_hint="--db")
    show = not as_json and err.is_terminal

    async def body() -> tuple[int, dict[str, int]]:
        async with connected(app.settings, cli_principal()) as nc:
            js = nc.jetstream(timeout=10)
            bar = Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           console=err, transient=True) if show else None
            with bar if bar is not None else nullcontext():
                task = bar.add_task("replay", total=None) if bar is not None else None

                def progress(done: int, total: int) -> None:
                    if bar is not None and task is not None:
                        bar.update(task, completed=done, total=total)

                position = await rebuild(js, db_path, until_seq=until_seq, until_time=until_time,
                                         on_progress=progress)
        db = await dbmod.open_db(db_path)
        try:
            rows = {table: len(content) for table, content in (await dbmod.dump(db)).items()}
        finally:
            await db.close()
        return position, rows

    position, rows = run(body)
    if as_json:
        out.print_json(data={"db": str(db_path), "position": position, "rows": rows})
    else:
        counts = ", ".join(f"{n} {t}" for t, n in rows.items() if t != "tracking")
        out.print(f"replayed audit seq 1..{position} into {db_path} ({counts})")
