"""Retention (router/retention.py, bus/archive.py): records leave AUDIT only into sealed
archive segments and only after an ``audit_archived`` record says so; the archive and the
stream verify as one chain; a router folds them as one log; anything removed outside the
rule is named by ``audit verify``; and a router killed mid-round loses and doubles nothing."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from ledgerbus.bus import anchor, codec, signing, subjects
from ledgerbus.bus import verify as verify_mod
from ledgerbus.bus.archive import Archive, ArchiveError, Manifest
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.records import ArchiveSeal, AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.bus.verify import LogReport, verify_log
from ledgerbus.projections import db as dbmod
from ledgerbus.router import audit
from ledgerbus.router.state import RouterState
from tests.conftest import RunningRouter
from tests.snapshot_support import canonical
from tests.support import Procs, agentctl, audit_records, send, wait_until

Connect = Callable[[str], Awaitable[Client]]

SEGMENT = 25


def retention_policy(archive: Path, max_age: str = "1s", archive_max_age: str = "0", max_bytes: str = "0") -> str:
    return f"""
[retention]
audit_max_age = "{max_age}"
audit_max_bytes = "{max_bytes}"
segment_records = {SEGMENT}
archive_dir = "{archive}"
archive_max_age = "{archive_max_age}"
check_every = "1s"
"""


def submitted(task_id: str) -> TaskSubmitted:
    return TaskSubmitted(id=new_id(), task_id=task_id, skill="echo", input={"text": task_id})


async def retaining_router(connect_as: Connect, settings: Settings, tmp_path: Path, tasks: int,
                           **policy: str) -> tuple[Archive, Settings, RunningRouter, Client]:
    """A router serving under a retention rule (``policy``: :func:`retention_policy`'s
    arguments), fed ``tasks`` echo submissions: the archive, the settings it runs with, the
    router, and the connection that submitted them."""
    archive = Archive(tmp_path / "archive")
    settings.policy_path.write_text(retention_policy(archive.path, **policy))
    tuned = settings.replace(snapshot_every=20, checkpoint_every=20)
    rr = RunningRouter(await connect_as("router"), tuned)
    await rr.start()
    cli = await connect_as("cli")
    for i in range(tasks):
        await send(cli, "cli", "alice", submitted(f"t{i}"))
    return archive, tuned, rr, cli


async def first_seq(js: Any) -> int:
    return int((await js.stream_info(subjects.AUDIT_STREAM)).state.first_seq)


async def whole_log(js: Any, archive: Archive) -> list[AuditRecord]:
    """Every record, the archived ones and the live ones, in order."""
    start = await first_seq(js)
    archived = [codec.read_record(seq, data) for seq, data in archive.records(1, start - 1)] if start > 1 else []
    return archived + await audit_records(js)


async def verified(js: Any, settings: Settings, archive: Archive, max_age_s: float = 0.0) -> LogReport:
    public = signing.public_hex(signing.load_or_create(settings.router_key_path))
    return await verify_log(js, public_key=public, max_gap=settings.checkpoint_every + settings.router_batch,
                            archive=archive, archive_max_age_s=max_age_s)


def failed(report: LogReport) -> dict[str, str]:
    return {f.check: f.detail for f in report.findings if not f.ok}


async def test_records_leave_audit_only_into_sealed_segments_and_verify_reads_both_as_one_chain(
    connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    archive, tuned, rr, cli = await retaining_router(connect_as, settings, tmp_path, 120)
    router, js = rr.router, admin.jetstream()
    assert router is not None

    async def archived() -> bool:
        return len(archive.manifest().segments) >= 4 and await first_seq(js) > 4 * SEGMENT

    await wait_until(archived, 30, what="four segments archived and purged from AUDIT")
    await rr.stop()

    manifest = archive.manifest()
    assert [(s.first_seq, s.last_seq) for s in manifest.segments] == [
        (1 + i * SEGMENT, (i + 1) * SEGMENT) for i in range(len(manifest.segments))]
    assert await first_seq(js) == manifest.segments[-1].last_seq + 1
    # Each file holds the records' exact stored bytes, one a line.
    lines = gzip.decompress((archive.path / manifest.segments[0].file).read_bytes()).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, SEGMENT + 1))
    records = await whole_log(js, archive)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    # Every purge was recorded first: the records that allowed them, and nothing else purged.
    notes = [r for r in records if r.kind == "audit_archived"]
    assert notes and all(r.principal == "router" and r.retention is not None for r in notes)
    assert max(r.retention.through_seq for r in notes) == manifest.segments[-1].last_seq  # type: ignore[union-attr]
    assert [s.file for r in notes for s in r.retention.segments] == [s.file for s in manifest.segments]  # type: ignore[union-attr]
    assert Counter(r.key for r in records if r.kind == "task_submitted") == {f"t{i}": 1 for i in range(120)}

    report = await verified(js, tuned, archive)
    assert report.ok, failed(report)
    assert report.head.seq == records[-1].seq
    assert "sealed and intact" in next(f.detail for f in report.findings if f.check == "archive")
    # Recorded LLM calls are kept as long as the records that name them: this archive keeps
    # them for ever (archive_max_age 0), so LLMCALLS drops its default age limit.
    assert (await js.stream_info(subjects.LLMCALLS_STREAM)).config.max_age == 0

    # A router with no snapshot to start from folds the archive and the stream as one log.
    state = RouterState(dedup_horizon_s=tuned.dedup_horizon_s)
    head = await audit.recover(js, state, anchor.Watch(), archive=archive)
    assert head == report.head
    ingress_first = (await js.stream_info(subjects.INGRESS_STREAM)).state.first_seq
    state.seen.forget_acked_before(ingress_first)
    router.state.seen.forget_acked_before(ingress_first)
    assert canonical(state) == canonical(router.state)
    again = RunningRouter(await connect_as("router"), tuned.replace(snapshot_every=0))
    await again.start()
    await again.stop()

    # What an operator sees and does with it.
    code, out, err = await agentctl(tuned, "archive", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)["segments"]
    assert [(s["first_seq"], s["last_seq"], s["status"]) for s in listed] == [
        (s.first_seq, s.last_seq, "kept") for s in manifest.segments]
    code, out, err = await agentctl(tuned, "archive", "verify")
    assert code == 0 and "intact" in out, out + err
    until = manifest.segments[-1].last_seq
    code, out, err = await agentctl(tuned, "archive", "restore", "--db", str(tmp_path / "then.db"), "--until-seq",
                                    str(until), "--json")
    assert code == 0, err
    assert json.loads(out)["position"] == until
    code, out, err = await agentctl(tuned, "tasks", "--db", str(tmp_path / "then.db"), "--json", "--limit", "500")
    assert code == 0, err
    submitted_by_then = {r.key for r in records if r.kind == "task_submitted" and r.seq <= until}
    assert {t["task_id"] for t in json.loads(out)} == submitted_by_then
    # A replay reads the archive and then the stream: at the same seq it equals the restore.
    code, out, err = await agentctl(tuned, "replay", "--db", str(tmp_path / "replayed.db"), "--until-seq", str(until))
    assert code == 0, err
    assert await digest(tmp_path / "replayed.db") == await digest(tmp_path / "then.db")
    code, out, err = await agentctl(tuned, "replay", "--db", str(tmp_path / "now.db"), "--json")
    assert code == 0 and json.loads(out)["position"] == records[-1].seq, err


async def test_verify_reads_through_a_purge_made_while_it_runs(
    connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verify reads the stream's state, then the archive, then the stream. A retention round
    that purges in between takes records verify meant to read from the stream; they are in
    the archive by then (a round seals before it purges), and verify reads them there. It
    said "seq 101: missing" instead, once in the chaos suite (router_kill, seed 146602)."""
    archive, tuned, rr, cli = await retaining_router(connect_as, settings, tmp_path, 60)
    js = admin.jetstream()

    async def purged_once() -> bool:
        return await first_seq(js) > SEGMENT

    await wait_until(purged_once, 30, what="a first segment archived and purged")
    read_stream = verify_mod._verify_chain
    waited: list[int] = []

    async def after_the_next_purge(*args: Any, **kwargs: Any) -> Any:
        if not waited:  # the first read of the stream waits for the router's next purge
            waited.append(await first_seq(js))
            for i in range(60, 120):
                await send(cli, "cli", "alice", submitted(f"t{i}"))

            async def purged_again() -> bool:
                return await first_seq(js) > waited[0]

            await wait_until(purged_again, 30, what="another segment purged")
        return await read_stream(*args, **kwargs)

    monkeypatch.setattr(verify_mod, "_verify_chain", after_the_next_purge)
    try:
        report = await verified(js, tuned, archive)
    finally:
        await rr.stop()
    assert waited, "verify never read the stream"
    assert report.ok, failed(report)


async def digest(path: Path) -> str:
    db = await dbmod.open_db(path)
    try:
        return await dbmod.digest(db)
    finally:
        await db.close()


async def test_verify_names_what_was_removed_outside_the_rule(
    connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    archive, tuned, rr, cli = await retaining_router(connect_as, settings, tmp_path, 80)
    js = admin.jetstream()

    async def purged() -> bool:  # a segment sealed but not yet purged is still checked in the stream
        return await _segments(archive, 2) and await first_seq(js) > 2 * SEGMENT

    await wait_until(purged, 30, what="two segments archived and purged from AUDIT")
    await rr.stop()
    assert (await verified(js, tuned, archive)).ok

    seal = archive.manifest().segments[1]
    path = archive.path / seal.file
    body = path.read_bytes()
    path.unlink()
    assert f"segment {seal.file} (records {seal.first_seq}..{seal.last_seq}) is missing" in \
        failed(await verified(js, tuned, archive))["hash chain"]
    code, out, err = await agentctl(tuned, "archive", "verify")
    assert code == 1 and f"segment {seal.file}" in err and "is missing" in err, out + err

    # A changed record, re-compressed, so only the seal's hash and the chain can tell.
    lines = gzip.decompress(body).split(b"\n")
    lines[3] = lines[3].replace(b'"t', b'"x', 1)
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    assert "was changed" in failed(await verified(js, tuned, archive))["hash chain"]
    path.write_bytes(body)

    # A seal dropped from the manifest (the file with it): the gap is named.
    manifest = archive.manifest()
    manifest.segments.pop(1)
    saved = archive.manifest_path.read_bytes()
    archive.write_manifest(manifest)
    assert f"segment missing: records {seal.first_seq}..{seal.last_seq}" in \
        failed(await verified(js, tuned, archive))["archive"]
    archive.manifest_path.write_bytes(saved)

    # A seal moved to `expired` though nobody expired it: deleted outside the rule.
    manifest = archive.manifest()
    manifest.expired, manifest.segments = manifest.segments[:1], manifest.segments[1:]
    archive.write_manifest(manifest)
    assert "no archive_expired record names it" in failed(await verified(js, tuned, archive, 3600.0))["archive"]
    archive.manifest_path.write_bytes(saved)

    # An admin purges past the last cut: records left the stream with no record allowing it.
    assert (await verified(js, tuned, archive)).ok
    cut = await first_seq(js)
    await js.purge_stream(subjects.AUDIT_STREAM, seq=cut + 3)
    assert f"records {cut}..{cut + 2} left the stream and are in no segment" in \
        failed(await verified(js, tuned, archive))["archive"]


async def _segments(archive: Archive, n: int) -> bool:
    return len(archive.manifest().segments) >= n


async def test_expired_segments_are_recorded_then_deleted_and_the_chain_still_verifies(
    connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    # By size this time (no age limit): past 8 KB, the oldest records leave.
    archive, tuned, rr, cli = await retaining_router(connect_as, settings, tmp_path, 80, max_age="0",
                                                     archive_max_age="2s", max_bytes="8KB")
    js = admin.jetstream()
    async def expired() -> bool:
        return bool(archive.manifest().expired)

    await wait_until(expired, 30, what="a segment expired")
    await rr.stop()
    manifest = archive.manifest()
    assert all(not (archive.path / s.file).exists() for s in manifest.expired)
    cuts = [r for r in await audit_records(js) if r.kind == "audit_archived"]  # the newest is always live
    assert cuts and all(r.reason.startswith("audit_max_bytes 8KB") for r in cuts)
    expiries = [r for r in await audit_records(js) if r.kind == "archive_expired"]
    named = {s.file for r in expiries for s in r.retention.segments}  # type: ignore[union-attr]
    assert {s.file for s in manifest.expired} <= named
    report = await verified(js, tuned, archive, 2.0)
    assert report.ok, failed(report)


async def test_a_router_killed_mid_round_loses_and_doubles_nothing(
    procs: Procs, admin: Client, settings: Settings, connect_as: Connect, tmp_path: Path
) -> None:
    archive = Archive(tmp_path / "archive")
    settings.policy_path.write_text(retention_policy(archive.path))
    tuned = {"LEDGERBUS_SNAPSHOT_EVERY": "20", "LEDGERBUS_CHECKPOINT_EVERY": "20"}
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "4")
    js, cli = admin.jetstream(), await connect_as("cli")
    task_ids: list[str] = []
    for n, point in enumerate(("router.archive_written", "router.archive_recorded")):
        router = await procs.start(f"router-{n}", "router", LEDGERBUS_FAILPOINTS=f"{point}=kill", **tuned)
        while router.proc.returncode is None and len(task_ids) < 600:
            for _ in range(10):
                task_ids.append(f"t{len(task_ids)}")
                await send(cli, "cli", "alice", submitted(task_ids[-1]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(router.proc.wait(), 0.3)
        assert router.proc.returncode == -9, f"the router was not killed at {point}"
    last = await procs.start("router-2", "router", **tuned)
    await procs.start("projector", "projector")
    await last.wait_logged("audit_purged")

    async def all_completed() -> bool:
        done = {r.key for r in await whole_log(js, archive) if r.accepted and r.kind == "task_completed"}
        return set(task_ids) <= done

    await wait_until(all_completed, 60, what="every task completed")
    await last.stop()
    records = await whole_log(js, archive)
    completed = Counter(r.key for r in records if r.accepted and r.kind == "task_completed")
    submissions = Counter(r.key for r in records if r.kind == "task_submitted")
    assert {completed[t] for t in task_ids} == {1} and {submissions[t] for t in task_ids} == {1}
    # The segments sealed before the first kill were recorded by the next router, once.
    recorded = [s.file for r in records if r.kind == "audit_archived" for s in r.retention.segments]  # type: ignore[union-attr]
    sealed = archive.manifest().segments
    # A round the last router's stop cut short may leave sealed segments not yet recorded
    # (the next leader records them); none of them has left the stream.
    assert recorded == [s.file for s in sealed][:len(recorded)]
    live_from = await first_seq(js)
    assert all(s.first_seq >= live_from for s in sealed[len(recorded):])
    code, out, err = await agentctl(settings, "audit", "verify")
    assert code == 0, out + err
    assert "sealed and intact" in out


def test_recorded_llm_calls_are_kept_as_long_as_the_records_that_name_them() -> None:
    from ledgerbus.bus.archive import RetentionRule
    from ledgerbus.router.retention import calls_max_age

    plain = Settings()
    assert calls_max_age(RetentionRule(audit_max_age="7d", archive_max_age="90d"), plain) == 97 * 86400
    assert calls_max_age(RetentionRule(audit_max_age="0", audit_max_bytes="0"), plain) == 0  # nothing leaves AUDIT
    assert calls_max_age(RetentionRule(audit_max_age="1d", archive_max_age="0"), plain) == 0  # the archive keeps all
    assert calls_max_age(RetentionRule(audit_max_age="0", audit_max_bytes="1GB", archive_max_age="30d"),
                         plain) == plain.llm_calls_max_age_s


def test_a_round_does_not_write_its_manifest_over_one_that_changed_since_it_read_it(tmp_path: Path) -> None:
    """Two routers' rounds in one archive: the leader that lost its lease mid-round, still
    writing from its thread, and the new leader, whose round sealed, recorded and purged
    meanwhile. The stale round must not drop the new leader's seal from the manifest."""
    def seal(first: int, last: int) -> ArchiveSeal:
        now = datetime.now(UTC)
        return ArchiveSeal(file=f"audit-{first}-{last}.jsonl.gz", first_seq=first, last_seq=last, first_at=now,
                           last_at=now, prev_hash="0" * 64, last_hash="1" * 64, sha256="2" * 64, bytes=1)

    archive = Archive(tmp_path)
    archive.write_manifest(Manifest(segments=[seal(1, 100)]))
    deposed, leader = archive.manifest(), archive.manifest()  # both rounds read the same one
    before = Manifest(segments=list(leader.segments))
    leader.segments.append(seal(101, 200))
    archive.write_manifest(leader, before)
    deposed.segments.append(seal(101, 150))  # a different cut, from the stale copy
    with pytest.raises(ArchiveError, match="changed since this round read it"):
        archive.write_manifest(deposed, before)
    assert [s.last_seq for s in archive.manifest().segments] == [100, 200]
