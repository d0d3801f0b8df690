"""Is the audit log intact, and do the projections follow from it? One check, which
``agentctl audit verify`` prints and the HTTP API (``GET /audit/verify``) answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from ledgerbus.bus import anchor, query
from ledgerbus.bus.archive import Archive, ArchiveError, configured
from ledgerbus.bus.errors import BusError, UnreadableRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.bus.verify import AnchorResult, Finding, LogReport, verify_log
from ledgerbus.projections.errors import LogGapError
from ledgerbus.projections.verify import compare_digest, compare_file


async def check(nc: Client, *, public_key: str | None, max_gap: int, anchor_file: Path | None,
                anchor_required: bool = False, projections: bool = True, db_path: Path | None = None,
                progress: Callable[[int, int], None] | None = None,
                settings: Settings | None = None) -> tuple[LogReport, list[Finding]]:
    """Verify the chain (hashes, sequences, signed checkpoints, anchors: the bucket's and,
    if there, the copy in ``anchor_file``; with ``settings``, the project's archive and the
    stream as one chain), then, with ``projections``, compare the live projection (or the
    file ``db_path``) with a rebuild from the log."""
    js = nc.jetstream(timeout=10)
    anchors = [await anchor.read_bucket_for_verify(js)]
    if anchor_file is not None:
        in_file = anchor.read_file_for_verify(anchor_file, required=anchor_required)
        if in_file is not None:
            anchors.append(in_file)
    archive, rule = configured(settings) if settings is not None else (None, None)
    report = await verify_log(js, progress, public_key, max_gap, anchors, archive,
                              rule.archive_max_age_s if rule is not None else 0.0)
    findings = list(report.findings)
    if projections:
        findings.append(await _projections(nc, js, db_path, archive))
    return report, findings


def as_json(report: LogReport, findings: list[Finding]) -> dict[str, Any]:
    """The verdict as ``agentctl audit verify --json`` prints it."""
    bad = next((f for f in findings if not f.ok), None)
    return {
        "ok": bad is None,
        "head": {"seq": report.head.seq, "hash": report.head.hash},
        "first_bad_seq": bad.seq if bad and bad.seq else None,
        "problem": f"{bad.check}: {bad.detail}" if bad else None,
        "checks": [{"check": f.check, "ok": f.ok, "detail": f.detail, "seq": f.seq or None} for f in findings],
        "restarted": report.restarted,
        "anchors": [_anchor_json(a) for a in report.anchors],
        "restarts": [{"seq": r.seq, "reason": r.reason} for r in report.restarts],
    }


def _anchor_json(result: AnchorResult) -> dict[str, Any]:
    """One anchor as ``--json`` shows it: where it was read, what it names, and the verdict."""
    found = result.anchor
    cp = found.checkpoint if found is not None else None
    return {
        "source": result.source, "ok": result.ok, "detail": result.detail, "seq": result.seq or None,
        "restarted": result.restarted,
        "checkpoint_seq": found.seq if found is not None else None,
        "covers_seq": cp.covers_seq if cp is not None else None,
        "chain_head": cp.chain_head if cp is not None else None,
        "key_id": cp.key_id if cp is not None else None,
        "signed_at": cp.at.isoformat() if cp is not None and cp.at is not None else None,
        "stream_created": found.stream_created.isoformat() if found is not None and found.stream_created else None,
    }


async def _projections(nc: Any, js: Any, db_path: Path | None, archive: Archive | None) -> Finding:
    try:
        if db_path is not None:
            check = await compare_file(js, db_path, archive)
        else:
            try:
                live = await query.ask(nc, "projections", "digest", {})
            except BusError as exc:
                return Finding("projections", False, f"not checked: {exc}")
            check = await compare_digest(js, live["position"], live["digest"], live.get("memory_list_cap"), archive)
    except ArchiveError as exc:
        return Finding("projections", False, f"not checked: {exc}")
    except UnreadableRecord as exc:
        # The projection holds a record this agentctl cannot rebuild (a newer projector's).
        return Finding("projections", False, f"not checked: {exc}", seq=exc.seq)
    except LogGapError as exc:
        # Records the rebuild needs are neither in AUDIT nor in the archive.
        return Finding("projections", False, f"not checked: {exc}")
    return Finding("projections", check.ok, check.detail)
