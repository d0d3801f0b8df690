"""The retention rule at work: records leave AUDIT only into the archive, and only after a
record of the chain says so (docs/architecture.md, Retention and archives).

One round, run by the leader router every ``[retention] check_every``:

1. in the background: find the cut (records due by age or size, in whole segments, never
   past the newest snapshot or the last checkpoint), read those records from AUDIT with
   their chain checked, write each segment (fsynced, renamed), seal it with the router's
   key and add the seal to the manifest;
2. in the serving loop, at a batch boundary: append the ``audit_archived`` record naming the
   seals and the cut (acknowledged, like every record, before anything acts on it);
3. in the background: purge AUDIT below the cut.

Segments past the archive's own retention are named in an ``archive_expired`` record first,
then deleted. A round cut short anywhere is finished by the next one: a sealed segment not
yet recorded is recorded, a recorded cut not yet purged is purged, a recorded expiry whose
files remain is carried out.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from ledgerbus.bus import codec, failpoints, signing, subjects
from ledgerbus.bus.archive import Archive, ArchiveError, Manifest, RetentionRule
from ledgerbus.bus.cancel import stop_task
from ledgerbus.bus.chain import GENESIS, ChainHead
from ledgerbus.bus.errors import ChainError, UnreadableRecord
from ledgerbus.bus.records import ArchiveSeal, AuditRecord, Retention, RetentionAction
from ledgerbus.bus.settings import Settings
from ledgerbus.router import segments
from ledgerbus.router.audit import AuditLog
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState

log = structlog.get_logger(__name__)

KINDS: dict[RetentionAction, str] = {"archived": "audit_archived", "expired": "archive_expired"}
MAX_SEGMENTS_PER_ROUND = 4
"""Segments one round writes (and one record names): few, so that the purge follows the
writing closely; a backlog takes several rounds, one right after the other."""


def rule_text(rule: RetentionRule, by_size: bool) -> str:
    return f"audit_max_bytes {rule.audit_max_bytes}" if by_size else f"audit_max_age {rule.audit_max_age}"


def calls_max_age(rule: RetentionRule, settings: Settings) -> float:
    """How long recorded LLM calls are kept under ``rule``: as long as AUDIT and the archive
    keep the records that name them (0, for ever, when nothing leaves AUDIT or the archive
    keeps everything; the setting when only a size bounds AUDIT)."""
    if not rule.enabled or rule.archive_max_age_s == 0:  # the log is kept for ever, somewhere
        return 0.0
    if rule.max_age_s > 0:
        return rule.max_age_s + rule.archive_max_age_s
    return settings.llm_calls_max_age_s


class Archiver:
    """The leader router's retention rounds."""

    def __init__(self, js: JetStreamContext, settings: Settings, key: Ed25519PrivateKey, policy: PolicyFile) -> None:
        self.js = js
        self.settings = settings
        self.key = key
        self.policy = policy
        self._job: asyncio.Task[Retention | None] | None = None
        self._next_at = 0.0
        self._backoff = 1.0
        self._unavailable = False
        self._calls_age: float | None = None
        self._following: asyncio.Task[None] | None = None

    def archive(self, rule: RetentionRule) -> Archive:
        return Archive(self.settings.in_home(Path(rule.archive_dir)))

    async def step(self, audit: AuditLog, state: RouterState, snapshot_seq: int | None,
                   append: Callable[[AuditRecord, bytes], Awaitable[None]]) -> None:
        """At a batch boundary: start a round when one is due, append the record of a
        round that is ready, and hand the purge or deletion it allows to the background.

        ``snapshot_seq``: the router's newest snapshot (None: snapshots are off). Raises
        :class:`AuditAppendError` if the log did not take the record (the caller recovers;
        the next round records the sealed segments again).
        """
        now = asyncio.get_running_loop().time()
        if self._job is not None:
            if not self._job.done():
                return
            job, self._job = self._job, None
            try:
                todo = job.result()
            except (nats.errors.Error, ArchiveError, ChainError, UnreadableRecord, OSError) as exc:
                self._next_at = now + self._backoff
                self._backoff = min(self._backoff * 2, 300.0)
                log.error("archive_failed", error=str(exc), retry_in_s=round(self._next_at - now, 1))
                return
            self._backoff = 1.0
            if todo is None:
                return
            record, data = audit.seal(AuditRecord(
                seq=0, at=datetime.now(UTC), verdict="accepted", code="ok", reason=todo.rule, principal="router",
                kind=KINDS[todo.action], key="router", msg_id="", ingress_seq=0, delivery=0, retention=todo,
            ))
            await append(record, data)
            state.apply(record)
            log.info(KINDS[todo.action], seq=record.seq, through_seq=todo.through_seq, rule=todo.rule,
                     segments=[s.file for s in todo.segments])
            failpoints.reached("router.archive_recorded")
            self._job = asyncio.create_task(self._carry_out(todo))
            self._next_at = now  # more may be due at once (a backlog, an expiry)
            return
        if now < self._next_at:
            return
        rule = self.policy.current().retention
        self._next_at = now + rule.check_every_s
        if (age := calls_max_age(rule, self.settings)) != self._calls_age:
            self._calls_age = age
            self._following = asyncio.create_task(self._follow(age))
        last_checkpoint = state.last_checkpoint_seq
        limit = min(audit.head.seq, last_checkpoint, snapshot_seq if snapshot_seq is not None else audit.head.seq)
        self._job = asyncio.create_task(self._round(rule, limit - 1))

    async def _follow(self, age: float) -> None:
        """Keep recorded LLM calls as long as the log that names them (LLMCALLS' max age)."""
        try:
            info = await self.js.stream_info(subjects.LLMCALLS_STREAM)
            if info.config.max_age != age:
                await self.js.update_stream(info.config, max_age=age)
                log.info("llm_calls_max_age", max_age_s=age)
        except nats.errors.Error as exc:
            self._calls_age = None  # tried again next round
            log.warning("llm_calls_max_age_failed", error=str(exc))

    async def stop(self) -> None:
        """Cancel a round in flight (the router is stopping or stepping down): a segment half
        written has no seal in the manifest and is written again; one sealed but not yet
        recorded is recorded by the next leader's first round."""
        if self._job is not None:
            await stop_task(self._job)
            self._job = None

    async def _round(self, rule: RetentionRule, limit: int) -> Retention | None:
        """Everything of a round up to its record: what the record should say, or None."""
        info = await self.js.stream_info(subjects.AUDIT_STREAM)
        if info.config.deny_purge:
            if not self._unavailable:
                self._unavailable = True
                log.warning("retention_unavailable", reason="AUDIT was created with deny_purge, which JetStream "
                            "cannot lift: nothing is archived. See docs/operations.md, Retention and archives")
            return None
        archive = self.archive(rule)
        manifest = await asyncio.to_thread(archive.manifest)
        recorded = await self._last(KINDS["archived"])
        through = recorded.through_seq if recorded is not None else 0
        unrecorded = [s for s in manifest.segments if s.last_seq > through]
        if unrecorded:
            log.warning("archive_recording_again", segments=[s.file for s in unrecorded])
            return Retention(action="archived", rule=f"{rule_text(rule, False)} (sealed before a restart)",
                             through_seq=unrecorded[-1].last_seq, segments=unrecorded)
        if through >= info.state.first_seq:
            # A cut recorded, its purge not done (the router died between the two). Only
            # what the archive holds may go: an archive directory lost or moved since is
            # reported, never purged past.
            if manifest.last_seq < through:
                raise ArchiveError(f"the log records records 1..{through} as archived, but the archive at "
                                   f"{archive.path} ends at seq {manifest.last_seq}: not purging; restore the "
                                   "archive directory (docs/operations.md)")
            await self._purge(through)
            info = await self.js.stream_info(subjects.AUDIT_STREAM)
        expired = await self._last(KINDS["expired"])
        if expired is not None:
            await self._expire(archive, expired)
            manifest = await asyncio.to_thread(archive.manifest)
        if (due := self._expired(rule, manifest, through)) is not None:
            return due
        if not rule.enabled:
            return None
        return await self._archive(rule, archive, manifest, info, min(limit, await self._due(rule, info)))

    def _expired(self, rule: RetentionRule, manifest: Manifest, through: int) -> Retention | None:
        if rule.archive_max_age_s <= 0:
            return None
        before = datetime.now(UTC) - timedelta(seconds=rule.archive_max_age_s)
        old = [s for s in manifest.segments if s.last_at < before and s.last_seq <= through]
        if not old:
            return None
        return Retention(action="expired", rule=f"archive_max_age {rule.archive_max_age}",
                         through_seq=old[-1].last_seq, segments=old)

    async def _due(self, rule: RetentionRule, info: StreamInfo) -> int:
        """The last record due to leave the stream (first_seq - 1: none)."""
        first, last = info.state.first_seq, info.state.last_seq
        cut = first - 1
        if rule.max_bytes > 0 and info.state.bytes > rule.max_bytes and info.state.messages:
            excess = info.state.bytes - rule.max_bytes
            cut = max(cut, first - 1 + math.ceil(excess / (info.state.bytes / info.state.messages)))
        if rule.max_age_s > 0 and last >= first:
            before = datetime.now(UTC) - timedelta(seconds=rule.max_age_s)
            lo, hi = first - 1, last  # the last record at or before `before` is in (lo, hi]
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (await self._at(mid)) <= before:
                    lo = mid
                else:
                    hi = mid - 1
            cut = max(cut, lo)
        return min(cut, last)

    async def _at(self, seq: int) -> datetime:
        msg = await self.js.get_msg(subjects.AUDIT_STREAM, seq)
        return codec.read_record(seq, msg.data or b"").at

    async def _archive(self, rule: RetentionRule, archive: Archive, manifest: Manifest, info: StreamInfo,
                       cut: int) -> Retention | None:
        start = manifest.last_seq + 1
        if start < info.state.first_seq:
            raise ArchiveError(f"AUDIT starts at seq {info.state.first_seq} but the archive at {archive.path} ends at "
                               f"seq {start - 1}: records {start}..{info.state.first_seq - 1} are in neither; "
                               "restore the archive directory (docs/operations.md)")
        n = rule.segment_records
        whole = min((cut - start + 1) // n, MAX_SEGMENTS_PER_ROUND)
        if whole <= 0:
            return None
        head = ChainHead(start - 1, manifest.last_hash or GENESIS)
        seals: list[ArchiveSeal] = []
        by_size = rule.max_bytes > 0 and info.state.bytes > rule.max_bytes
        for i in range(whole):
            first, last = start + i * n, start + (i + 1) * n - 1
            # In a child process: reading and compressing on the event loop held routing up.
            seal = signing.sign(self.key, await segments.in_child(self.settings, archive, first, last, head))
            head = ChainHead(seal.last_seq, seal.last_hash)
            before = _copy(manifest)
            manifest.segments.append(seal)
            await asyncio.to_thread(archive.write_manifest, manifest, before)
            seals.append(seal)
            log.info("archive_segment_written", file=seal.file, first_seq=first, last_seq=last, bytes=seal.bytes)
        failpoints.reached("router.archive_written")
        return Retention(action="archived", rule=rule_text(rule, by_size), through_seq=seals[-1].last_seq,
                         segments=seals)

    async def _last(self, kind: str) -> Retention | None:
        """The newest record of ``kind`` the live stream holds, if any."""
        try:
            msg = await self.js.get_msg(subjects.AUDIT_STREAM, subject=subjects.audit("accepted", kind, "router"))
        except nats.js.errors.NotFoundError:
            return None
        return codec.read_record(msg.seq or 0, msg.data or b"").retention

    async def _carry_out(self, todo: Retention) -> None:
        """What a record allows, once it is acknowledged: the purge, or the deletion."""
        if todo.action == "archived":
            await self._purge(todo.through_seq)
        else:
            await self._expire(self.archive(self.policy.current().retention), todo)

    async def _purge(self, through: int) -> None:
        await self.js.purge_stream(subjects.AUDIT_STREAM, seq=through + 1)
        log.info("audit_purged", through_seq=through)

    async def _expire(self, archive: Archive, expired: Retention) -> None:
        """Delete the expired segments' files and move their seals to ``expired``."""
        manifest = await asyncio.to_thread(archive.manifest)
        names = {s.file for s in expired.segments}
        gone = [s for s in manifest.segments if s.file in names]
        if not gone:
            return
        # Files first: a crash before the manifest is rewritten leaves seals whose files
        # are gone, which the recorded expiry explains and the next round tidies up.
        for seal in gone:
            archive.segment_path(seal).unlink(missing_ok=True)
        before = _copy(manifest)
        manifest.segments = [s for s in manifest.segments if s.file not in names]
        manifest.expired.extend(gone)
        await asyncio.to_thread(archive.write_manifest, manifest, before)
        log.info("archive_segments_deleted", segments=[s.file for s in gone])


def _copy(manifest: Manifest) -> Manifest:
    """The manifest as it is now (its seals are immutable; its lists are not)."""
    return msgspec.structs.replace(manifest, segments=list(manifest.segments), expired=list(manifest.expired))
