"""``agentctl archive``: the segments the retention rule wrote (list, verify) and an
archived range replayed into a projection file for an investigation (restore)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ledgerbus.agentctl.common import EXIT_FAILED, App, err, fail, out, run
from ledgerbus.agentctl.reads import json_option
from ledgerbus.bus import codec, signing
from ledgerbus.bus.archive import Archive, ArchiveError, RetentionRule, configured
from ledgerbus.bus.errors import ConfigError, UnreadableRecord
from ledgerbus.bus.records import ArchiveSeal
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.apply import Applier

BATCH = 1024


def _archive(app: App, directory: Path | None) -> tuple[Archive, RetentionRule]:
    try:
        archive, rule = configured(app.settings)
    except ConfigError as exc:
        fail(str(exc))
    return (Archive(directory), rule) if directory is not None else (archive, rule)


dir_option = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                          help="The archive directory. [default: [retention] archive_dir of policy.toml]")


def _when(at: datetime) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _seal_json(seal: ArchiveSeal, status: str, problem: str = "") -> dict[str, Any]:
    return {"file": seal.file, "first_seq": seal.first_seq, "last_seq": seal.last_seq,
            "records": seal.last_seq - seal.first_seq + 1, "first_at": seal.first_at.isoformat(),
            "last_at": seal.last_at.isoformat(), "bytes": seal.bytes, "sha256": seal.sha256, "status": status,
            "problem": problem or None}


@click.group()
def archive() -> None:
    """The audit archive: records that left the live stream under the retention rule."""


@archive.command("list")
@dir_option
@json_option
@click.pass_obj
def list_(app: App, directory: Path | None, as_json: bool) -> None:
    """The archive's segments, oldest first: their records, times and sizes, and those
    deleted under the archive's own retention."""
    where, rule = _archive(app, directory)
    try:
        manifest = where.manifest()
    except ArchiveError as exc:
        fail(str(exc), EXIT_FAILED)
    rows = [(s, "expired") for s in manifest.expired] + [(s, "kept") for s in manifest.segments]
    if as_json:
        out.print_json(data={"dir": str(where.path), "rule": {f: getattr(rule, f) for f in rule.__struct_fields__},
                             "segments": [_seal_json(s, status) for s, status in rows]})
        return
    if not rows:
        out.print(f"no segments in {where.path} (audit_max_age {rule.audit_max_age}, "
                  f"audit_max_bytes {rule.audit_max_bytes})")
        return
    table = Table("segment", "records", "first", "last", "size", "status", box=None)
    for seal, status in rows:
        table.add_row(seal.file, f"{seal.first_seq}..{seal.last_seq}", _when(seal.first_at), _when(seal.last_at),
                      f"{seal.bytes / 1024:.0f} KiB", "[dim]expired[/]" if status == "expired" else status)
    out.print(table)
    kept = sum(s.bytes for s in manifest.segments)
    out.print(f"{len(manifest.segments)} kept ({kept / 2**20:.1f} MiB), {len(manifest.expired)} expired, in "
              f"{where.path}; records 1..{manifest.last_seq} archived")


@archive.command("verify")
@dir_option
@click.option("--pubkey", type=click.Path(dir_okay=False, path_type=Path),
              help="The router's public key (default: next to LEDGERBUS_ROUTER_KEY_PATH, .pub).")
@json_option
@click.pass_obj
def verify(app: App, directory: Path | None, pubkey: Path | None, as_json: bool) -> None:
    """Check every segment on its own: its seal is the router's, its file is there and
    unchanged, its records chain from the segment before to the sealed hash. Needs no
    server; `agentctl audit verify` checks archive and live stream as one chain."""
    where, _ = _archive(app, directory)
    key_file = pubkey or signing.public_path(app.settings.router_key_path)
    try:
        public_key = signing.load_public(key_file) if (pubkey is not None or key_file.exists()) else None
    except ConfigError as exc:
        fail(str(exc))
    try:
        results = list(where.check(public_key))
    except ArchiveError as exc:
        fail(str(exc), EXIT_FAILED)
    bad = [(s, p) for s, p in results if p]
    if as_json:
        out.print_json(data={"ok": not bad, "dir": str(where.path), "signatures_checked": public_key is not None,
                             "segments": [_seal_json(s, "kept", p) for s, p in results]})
    else:
        table = Table("segment", "records", "", "detail", box=None)
        for seal, problem in results:
            table.add_row(seal.file, f"{seal.first_seq}..{seal.last_seq}",
                          "[red]FAILED[/]" if problem else "[green]ok[/]", problem)
        out.print(table)
        if public_key is None:
            err.print(f"[yellow]signatures not checked[/]: no public key at {key_file} (--pubkey)")
        if not bad:
            out.print(f"[green]intact[/]: {len(results)} segments in {where.path}")
        else:
            seal, problem = bad[0]
            err.print(f"[red]not intact[/]: segment {seal.file} (records {seal.first_seq}..{seal.last_seq}): {problem}")
    if bad:
        sys.exit(EXIT_FAILED)


@archive.command("restore")
@dir_option
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The new projection file to write (must not exist).")
@click.option("--until-seq", type=click.IntRange(min=1), help="Stop after this sequence (default: the archive's end).")
@json_option
@click.pass_obj
def restore(app: App, directory: Path | None, db_path: Path | None, until_seq: int | None, as_json: bool) -> None:
    """Replay the archived records into a new projection file, as the projector would have
    made it at --until-seq (default: the last archived record): tasks, memory, approvals and
    the audit index of that time, for `agentctl tasks --db FILE` and the other reads."""
    assert db_path is not None
    if db_path.exists():
        raise click.BadParameter(f"{db_path} exists: restore writes a new file", param_hint="--db")
    where, _ = _archive(app, directory)
    try:
        manifest = where.manifest()
    except ArchiveError as exc:
        fail(str(exc), EXIT_FAILED)
    if not manifest.segments:
        fail(f"no segments in {where.path}", EXIT_FAILED)
    first = manifest.segments[0].first_seq
    last = min(until_seq or manifest.last_seq, manifest.last_seq)
    if until_seq is not None and until_seq < first:
        fail(f"records up to {until_seq} expired from the archive; it starts at seq {first}", EXIT_FAILED)
    if first > 1 and not as_json:
        err.print(f"[yellow]records 1..{first - 1} expired from the archive[/]: what they made is missing from the file")
    show = not as_json and err.is_terminal

    async def body() -> tuple[int, dict[str, int]]:
        bar = Progress(TextColumn("restoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=err, transient=True) if show else None
        with bar if bar is not None else nullcontext():
            task = bar.add_task("restore", total=last - first + 1) if bar is not None else None
            async with await Applier.open(db_path, app.settings.memory_list_cap) as applier:
                batch = []
                for seq, data in where.records(first, last):
                    batch.append(codec.read_record(seq, data))
                    if len(batch) == BATCH:
                        await applier.submit(batch)
                        batch = []
                        if bar is not None and task is not None:
                            bar.update(task, completed=seq - first + 1)
                await applier.submit(batch)
                position = await applier.drain()
        db = await dbmod.open_db(db_path)
        try:
            return position, await dbmod.row_counts(db)
        finally:
            await db.close()

    try:
        position, rows = run(body)
    except (ArchiveError, UnreadableRecord) as exc:
        for suffix in ("", "-wal", "-shm"):
            db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
        fail(str(exc), EXIT_FAILED)
    if as_json:
        out.print_json(data={"db": str(db_path), "from_seq": first, "position": position, "rows": rows})
    else:
        counts = ", ".join(f"{n} {t}" for t, n in rows.items() if t not in ("tracking", "meta"))
        out.print(f"restored archived records {first}..{position} into {db_path} ({counts})")
