"""Verifying the audit log as stored: its stream configuration, contiguity, and hash chain.

The router's signed checkpoints anchor the chain: without its private key nobody can
write a history that both chains and carries valid checkpoints at the router's spacing.
The last of them is also kept outside the stream (:mod:`bus.anchor`), so a log deleted
or replaced whole, which would otherwise verify as a fresh chain, is reported as a chain
that restarted.

Each check yields a :class:`Finding`; the first failing one names the first bad sequence
where there is one. Reading is sequential through an ordered consumer, so a record that
JetStream cannot read back (a byte changed on disk fails JetStream's own checksum) shows
up as a missing sequence, and a record altered consistently enough to pass that checksum
fails the hash chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamInfo

from ledgerbus.bus import anchor, chain, codec, signing, subjects
from ledgerbus.bus.archive import Archive, ArchiveError
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.errors import ChainError, UnreadableRecord
from ledgerbus.bus.records import ArchiveSeal, AuditRecord

Progress = Callable[[int, int], None]
"""Called with (records read, records in all) while the chain is checked."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's result: ``seq`` is the first bad sequence, 0 if none applies."""

    check: str
    ok: bool
    detail: str
    seq: int = 0


@dataclass(frozen=True, slots=True)
class AnchorResult:
    """One place the chain's anchor is kept, what it held, and what the stream says to it."""

    source: str
    anchor: anchor.Anchor | None
    ok: bool
    detail: str
    seq: int = 0
    superseded_at: int = 0
    """The restart record that superseded this anchor, 0 if none did."""
    restarted: bool = False
    """Whether the stream restarted since this anchor (refused, or accepted by an operator)."""


@dataclass(slots=True)
class LogReport:
    """Everything :func:`verify_log` found, in the order it checked."""

    findings: list[Finding] = field(default_factory=list)
    head: ChainHead = field(default_factory=ChainHead)
    anchors: list[AnchorResult] = field(default_factory=list)
    """Each anchor read, and whether the stream still holds it."""
    restarts: list[AuditRecord] = field(default_factory=list)
    """The records with which an operator accepted a new chain (``--accept-new-chain``)."""

    @property
    def restarted(self) -> bool:
        """Whether the chain restarted: an anchor the stream no longer holds, or a restart
        an operator accepted."""
        return bool(self.restarts) or any(r.restarted for r in self.anchors)

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(f.ok for f in self.findings)


def config_findings(info: StreamInfo) -> list[str]:
    """What is wrong with the AUDIT stream's configuration for an append-only log. A purge
    is allowed (the retention rule's, below a cut the chain records first: checked by
    :func:`verify_log`); no other way for records to leave is."""
    c = info.config
    problems = []
    if not c.deny_delete:
        problems.append("deny_delete is off: records can be deleted")
    if c.allow_rollup_hdrs:
        problems.append("rollup headers are allowed: a record can replace others")
    if c.max_age:
        problems.append(f"max_age is {c.max_age}s: records expire")
    if c.retention not in (None, RetentionPolicy.LIMITS):
        problems.append(f"retention is {c.retention}: records are removed when consumed")
    for name in ("max_msgs", "max_bytes", "max_msgs_per_subject"):
        value = getattr(c, name)
        if value not in (None, -1, 0):
            problems.append(f"{name} is {value}: old records are dropped at that limit")
    if c.storage not in (None, StorageType.FILE):
        problems.append(f"storage is {c.storage}: the log does not survive a restart")
    if getattr(c, "allow_msg_ttl", None):
        problems.append("per-message TTLs are allowed: records can expire")
    return problems


class CheckpointWalk:
    """Follows the signed checkpoints along the chain; remembers the first thing wrong.

    Each checkpoint must cover exactly the record before it with that record's hash,
    follow the previous checkpoint, and carry a valid signature by the router's key; and
    no stretch of records may go longer than the router's spacing without one. A log
    rewritten with a fresh, valid chain but without the router's key fails here.
    """

    def __init__(self, public_key: str | None, max_gap: int) -> None:
        self.public_key = public_key
        self.max_gap = max_gap
        self.last_seq = 0
        self.count = 0
        self.problem: tuple[int, str] | None = None
        self._resumed = False
        self.retention: list[AuditRecord] = []
        """The ``audit_archived`` and ``archive_expired`` records seen."""

    def resume(self, seq: int) -> None:
        """Start after ``seq`` (the records before it expired from the archive): the first
        checkpoint seen follows one this walk cannot see."""
        self.last_seq, self._resumed = seq, True

    def _fail(self, seq: int, detail: str) -> None:
        if self.problem is None:
            self.problem = (seq, detail)

    def record(self, record: AuditRecord, before: ChainHead) -> None:
        """Look at a record just verified; ``before`` is the head before it."""
        seq, cp = record.seq, record.checkpoint
        if record.retention is not None and record.principal == "router":
            self.retention.append(record)
        if cp is None:
            if seq - self.last_seq > self.max_gap:
                self._fail(seq, f"seq {seq}: more than {self.max_gap} records since the last signed checkpoint")
            return
        if (cp.covers_seq, cp.chain_head) != (before.seq, before.hash):
            self._fail(seq, f"seq {seq}: the checkpoint does not cover the record before it")
        elif cp.prev_checkpoint_seq != self.last_seq and not self._resumed:
            self._fail(seq, f"seq {seq}: the checkpoint does not follow the one at seq {self.last_seq}")
        elif self.public_key is not None and not signing.valid(self.public_key, cp):
            self._fail(seq, f"seq {seq}: the checkpoint's signature does not verify with the router's key")
        self.last_seq, self.count, self._resumed = seq, self.count + 1, False

    def finding(self, head: ChainHead) -> Finding:
        """The verdict on every checkpoint seen up to ``head``."""
        if self.problem is not None:
            return Finding("checkpoints", False, self.problem[1], seq=self.problem[0])
        if self.public_key is None and self.count:
            return Finding("checkpoints", False, f"{self.count} signatures not checked: no public key given")
        tail = head.seq - self.last_seq
        return Finding("checkpoints", True, f"{self.count} signed checkpoints valid; {tail} records since the last")


async def verify_log(
    js: JetStreamContext,
    on_progress: Progress | None = None,
    public_key: str | None = None,
    max_gap: int = 1000 + 256,
    anchors: Sequence[anchor.Read] = (),
    archive: Archive | None = None,
    archive_max_age_s: float = 0.0,
) -> LogReport:
    """Check the AUDIT stream's configuration, its contiguity from 1, the whole chain, the
    signed checkpoints (with ``public_key``, the router's, hex), and that the stream still
    holds the checkpoint each of ``anchors`` names.

    Records the stream no longer holds must be in ``archive`` (the retention rule's), read
    as one chain with the stream: every segment sealed by the router's key, unchanged, and
    contiguous; those deleted under the archive's retention (``archive_max_age_s``) named
    by an ``archive_expired`` record, or older than that retention; and the purge allowed by
    an ``audit_archived`` record."""
    report = LogReport()
    info = await js.stream_info(subjects.AUDIT_STREAM)
    problems = config_findings(info)
    report.findings.append(Finding("stream config", not problems, "; ".join(problems) or "append-only"))

    state = info.state
    deleted = state.num_deleted or 0
    purged = state.first_seq - 1 if state.last_seq else 0
    if deleted:
        report.findings.append(Finding(
            "contiguity", False,
            f"the stream holds {state.messages} of {state.last_seq - purged} records from seq {state.first_seq} "
            f"({deleted} deleted)", seq=min(state.deleted) if state.deleted else 0,
        ))
    elif purged:
        report.findings.append(Finding("contiguity", True, f"seq {state.first_seq}..{state.last_seq} live, "
                                       f"nothing deleted; 1..{purged} left for the archive"))
    else:
        report.findings.append(Finding("contiguity", True, f"seq 1..{state.last_seq}, nothing deleted"))

    walk = CheckpointWalk(public_key, max_gap)
    watch = anchor.Watch.of(a.anchor for a in anchors if a.anchor is not None)
    archived = ArchiveWalk(archive, public_key, archive_max_age_s)
    try:
        start = archived.start(purged)
        if start.seq:
            walk.resume(start.seq)
        head = await archived.read(start, purged, walk, watch, on_progress, state.last_seq)
        if head.seq < purged:
            # The archive cannot give what left the stream (the "archive" check says why):
            # the live records are still checked, from the link the first one names.
            head = ChainHead(purged, await _first_link(js, state.first_seq))
            walk.resume(purged)
        report.head = await _read_live(js, state.last_seq, on_progress, walk, watch, head, archived, purged)
        if report.head.seq < state.last_seq:
            seq = report.head.seq + 1
            raise ChainError(f"seq {seq}: missing (deleted, or unreadable on disk); read up to {report.head.seq}", seq)
        report.findings.append(Finding("hash chain", True, f"{report.head.seq} records, head {report.head.hash[:16]}…"))
    except ChainError as exc:
        report.findings.append(Finding("hash chain", False, str(exc), seq=exc.seq))
    except UnreadableRecord as exc:
        report.findings.append(Finding("hash chain", False, f"{exc}; not checked past it", seq=exc.seq))
    report.findings.append(walk.finding(report.head))
    if purged or (archive is not None and archive.manifest_path.exists()):
        report.findings.append(archived.finding(purged, walk))
    report.restarts = list(watch.restarts)
    report.anchors = [_compare(read, report.head, state.last_seq, watch, info.created, public_key) for read in anchors]
    report.findings.append(_anchor_finding(report))
    return report


def _compare(read: anchor.Read, head: ChainHead, last_seq: int, watch: anchor.Watch, created: datetime | None,
             public_key: str | None) -> AnchorResult:
    if read.anchor is None:
        if read.problem:
            return AnchorResult(read.source, None, False, read.problem)
        return AnchorResult(read.source, None, True, f"no anchor in {read.source} yet")
    cp = read.anchor.checkpoint
    if public_key is not None and not signing.valid(public_key, cp):
        return AnchorResult(read.source, read.anchor, False,
                            f"the anchor in {read.source} is not signed by the router's key (key {cp.key_id})")
    if head.seq < read.anchor.seq <= last_seq:
        return AnchorResult(read.source, read.anchor, False,
                            f"not compared with {read.source}: the chain breaks before seq {read.anchor.seq}")
    found = anchor.compare(read.anchor, head, watch, created, read.source)
    return AnchorResult(read.source, read.anchor, found.ok, found.detail, found.seq, found.superseded_at,
                        restarted=not found.ok or bool(found.superseded_at))


def _anchor_finding(report: LogReport) -> Finding:
    """One finding over every anchor read, and every restart an operator accepted."""
    bad = [r for r in report.anchors if not r.ok]
    if bad:
        return Finding("anchor", False, "; ".join(r.detail for r in bad), seq=min((r.seq for r in bad if r.seq),
                                                                                   default=0))
    details = [r.detail for r in report.anchors if r.anchor is not None]
    superseded = {r.superseded_at for r in report.anchors}
    details += [f"the chain restarted at seq {r.seq}, accepted by the operator: {r.reason}"
                for r in report.restarts if r.seq not in superseded]
    if not details:
        sources = ", ".join(r.source for r in report.anchors) or "no anchor given"
        details.append(f"no anchor to compare with ({sources})")
    return Finding("anchor", True, "; ".join(details))


async def _first_link(js: JetStreamContext, seq: int) -> str:
    """The ``prev_hash`` of the record at ``seq``, the stream's first (read as every reader
    reads AUDIT, through an ordered consumer)."""
    sub = await js.subscribe(subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq))
    try:
        msg = await sub.next_msg(timeout=5)
    finally:
        await sub.unsubscribe()
    return codec.read_record(msg.metadata.sequence.stream, msg.data).prev_hash


async def _read_live(
    js: JetStreamContext, last: int, on_progress: Progress | None, walk: CheckpointWalk, watch: anchor.Watch,
    head: ChainHead, archived: ArchiveWalk, purged: int,
) -> ChainHead:
    """The stream's records after ``head`` up to ``last``. A retention round may purge some
    of them while the archive was being read (it purges only what the archive already
    holds): then they are read from the archive's newer segments, and the stream after."""
    while True:
        head, next_seq = await _verify_chain(js, last, on_progress, walk, watch, head)
        if head.seq >= last:
            return head
        if archived.archive is not None:
            state = (await js.stream_info(subjects.AUDIT_STREAM)).state
            now_purged = state.first_seq - 1 if state.last_seq else 0
            if now_purged > max(purged, head.seq):
                archived.start(now_purged)  # the manifest as it is now
                further = await archived.read(head, now_purged, walk, watch, on_progress, last)
                if further.seq > head.seq:
                    head, purged = further, now_purged
                    continue
        if next_seq:  # not purged meanwhile: what is missing is missing
            raise ChainError(f"seq {head.seq + 1}: missing (deleted, or unreadable on disk); the next record is "
                             f"seq {next_seq}", head.seq + 1)
        return head


async def _verify_chain(
    js: JetStreamContext, last: int, on_progress: Progress | None, walk: CheckpointWalk, watch: anchor.Watch,
    head: ChainHead = ChainHead(),
) -> tuple[ChainHead, int]:
    """The stream's records after ``head`` up to ``last`` into the chain; the head reached,
    and the sequence of the record that came next if it was not the one after the head."""
    if last <= head.seq:
        return head, 0
    sub = await js.subscribe(
        subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=head.seq + 1),
    )
    try:
        while head.seq < last:
            try:
                msg = await sub.next_msg(timeout=5)
            except TimeoutError:
                break  # nothing more will come: what is left unread is missing
            seq = msg.metadata.sequence.stream
            if seq != head.seq + 1:
                return head, seq
            before = head
            record, head = chain.verify_next(seq, msg.data, head)
            walk.record(record, before)
            watch.record(record)
            if on_progress is not None:
                on_progress(head.seq, last)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return head, 0


class ArchiveWalk:
    """The archive's part of the chain: its seals, its files, and what allowed each record
    to leave the stream."""

    def __init__(self, archive: Archive | None, public_key: str | None, max_age_s: float) -> None:
        self.archive = archive
        self.public_key = public_key
        self.max_age_s = max_age_s
        self.segments: list[ArchiveSeal] = []
        self.expired: list[ArchiveSeal] = []
        self.problem: tuple[int, str] | None = None

    def _fail(self, seq: int, detail: str) -> None:
        if self.problem is None:
            self.problem = (seq, detail)

    def start(self, purged: int) -> ChainHead:
        """Where the readable chain starts: after the segments deleted under the archive's
        retention (their last seal vouches for the hash), else at the beginning."""
        if self.archive is None:
            if purged:
                self._fail(1, f"records 1..{purged} left the stream and no archive was given to read them from")
            return ChainHead()
        try:
            manifest = self.archive.manifest()
        except ArchiveError as exc:
            self._fail(1, str(exc))
            return ChainHead()
        self.segments, self.expired = manifest.segments, manifest.expired
        seals = [*self.expired, *self.segments]
        expected = 1
        for seal in seals:
            if self.public_key is not None and not signing.valid(self.public_key, seal):
                self._fail(seal.first_seq, f"segment {seal.file}: its seal is not signed by the router's key")
            if seal.first_seq != expected:
                gap = f"{expected}..{seal.first_seq - 1}" if seal.first_seq > expected else f"{seal.first_seq}.."
                self._fail(expected, f"segment missing: records {gap} are in no segment of {self.archive.path}")
            expected = seal.last_seq + 1
        if purged and expected <= purged:
            self._fail(expected, f"segment missing: records {expected}..{purged} left the stream and are in no "
                                 f"segment of {self.archive.path}")
        if not self.expired:
            return ChainHead()
        last = self.expired[-1]
        return ChainHead(last.last_seq, last.last_hash)

    async def read(self, head: ChainHead, purged: int, walk: CheckpointWalk, watch: anchor.Watch,
                   on_progress: Progress | None, last: int) -> ChainHead:
        """Verify the archived records after ``head`` up to ``purged`` into the chain (a
        segment still live in the stream, sealed but not yet purged, is read from the
        stream, which is what holds the record while it is there)."""
        if self.archive is None or self.problem is not None:
            return head
        for seal in self.segments:
            if seal.last_seq <= head.seq:
                continue  # read already
            if seal.last_seq > purged:
                break
            if seal.first_seq != head.seq + 1 or seal.prev_hash != head.hash:
                raise ChainError(f"seq {seal.first_seq}: segment {seal.file} does not link to the record before it",
                                 seal.first_seq)
            try:
                records = self.archive.read_segment(seal)
            except ArchiveError as exc:
                raise ChainError(f"seq {seal.first_seq}: {exc}", seal.first_seq) from exc
            for seq, data in records:
                before = head
                record, head = chain.verify_next(seq, data, head)
                walk.record(record, before)
                watch.record(record)
            if head.hash != seal.last_hash:
                raise ChainError(f"seq {seal.last_seq}: segment {seal.file} does not end at its sealed hash",
                                 seal.last_seq)
            if on_progress is not None:
                on_progress(head.seq, last)
        return head

    def finding(self, purged: int, walk: CheckpointWalk) -> Finding:
        """The verdict on the archive, and on what let every archived record leave."""
        if self.problem is not None:
            return Finding("archive", False, self.problem[1], seq=self.problem[0])
        through = max((r.retention.through_seq for r in walk.retention
                       if r.retention is not None and r.retention.action == "archived"), default=0)
        if purged > through:
            return Finding("archive", False, f"records {through + 1}..{purged} left the stream, but no "
                           f"audit_archived record allows it (the last allows 1..{through})", seq=through + 1)
        named = {s.file for r in walk.retention if r.retention is not None and r.retention.action == "expired"
                 for s in r.retention.segments}
        now = datetime.now(UTC)
        for seal in self.expired:
            if seal.file not in named and (self.max_age_s <= 0
                                           or seal.last_at > now - timedelta(seconds=self.max_age_s)):
                return Finding("archive", False, f"segment {seal.file} (records {seal.first_seq}..{seal.last_seq}) "
                               "was deleted, but no archive_expired record names it and it is within the "
                               "archive's retention", seq=seal.first_seq)
        kept = sum(s.last_seq - s.first_seq + 1 for s in self.segments)
        gone = self.expired[-1].last_seq if self.expired else 0
        where = self.archive.path if self.archive is not None else "-"
        return Finding("archive", True, f"{len(self.segments)} segments ({kept} records) sealed and intact in "
                       f"{where}; records 1..{gone} deleted under the archive's retention" if gone else
                       f"{len(self.segments)} segments ({kept} records) sealed and intact in {where}")
