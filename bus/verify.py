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
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, RetentionPolicy, StorageType, StreamInfo

from ledgerbus.bus import anchor, chain, signing, subjects
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.errors import ChainError, UnreadableRecord
from ledgerbus.bus.events import AuditRecord

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
    """What is wrong with the AUDIT stream's configuration for an append-only log."""
    c = info.config
    problems = []
    if not c.deny_delete:
        problems.append("deny_delete is off: records can be deleted")
    if not c.deny_purge:
        problems.append("deny_purge is off: the stream can be purged")
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

    def _fail(self, seq: int, detail: str) -> None:
        if self.problem is None:
            self.problem = (seq, detail)

    def record(self, record: AuditRecord, before: ChainHead) -> None:
        """Look at a record just verified; ``before`` is the head before it."""
        seq, cp = record.seq, record.checkpoint
        if cp is None:
            if seq - self.last_seq > self.max_gap:
                self._fail(seq, f"seq {seq}: more than {self.max_gap} records since the last signed checkpoint")
            return
        if (cp.covers_seq, cp.chain_head) != (before.seq, before.hash):
            self._fail(seq, f"seq {seq}: the checkpoint does not cover the record before it")
        elif cp.prev_checkpoint_seq != self.last_seq:
            self._fail(seq, f"seq {seq}: the checkpoint does not follow the one at seq {self.last_seq}")
        elif self.public_key is not None and not signing.valid(self.public_key, cp):
            self._fail(seq, f"seq {seq}: the checkpoint's signature does not verify with the router's key")
        self.last_seq, self.count = seq, self.count + 1

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
) -> LogReport:
    """Check the AUDIT stream's configuration, its contiguity from 1, the whole chain, the
    signed checkpoints (with ``public_key``, the router's, hex), and that the stream still
    holds the checkpoint each of ``anchors`` names."""
    report = LogReport()
    info = await js.stream_info(subjects.AUDIT_STREAM)
    problems = config_findings(info)
    report.findings.append(Finding("stream config", not problems, "; ".join(problems) or "append-only"))

    state = info.state
    deleted = state.num_deleted or 0
    if state.last_seq and (state.first_seq != 1 or deleted):
        first_gap = state.first_seq if state.first_seq != 1 else (min(state.deleted) if state.deleted else 0)
        report.findings.append(Finding(
            "contiguity", False,
            f"the stream holds {state.messages} of {state.last_seq} records "
            f"(first seq {state.first_seq}, {deleted} deleted)",
            seq=1 if state.first_seq != 1 else first_gap,
        ))
    else:
        report.findings.append(Finding("contiguity", True, f"seq 1..{state.last_seq}, nothing deleted"))

    walk = CheckpointWalk(public_key, max_gap)
    watch = anchor.Watch.of(a.anchor for a in anchors if a.anchor is not None)
    try:
        report.head = await _verify_chain(js, state.last_seq, on_progress, walk, watch)
        if report.head.seq < state.last_seq:
            seq = report.head.seq + 1
            raise ChainError(f"seq {seq}: missing (deleted, or unreadable on disk); read up to {report.head.seq}", seq)
        report.findings.append(Finding("hash chain", True, f"{report.head.seq} records, head {report.head.hash[:16]}…"))
    except ChainError as exc:
        report.findings.append(Finding("hash chain", False, str(exc), seq=exc.seq))
    except UnreadableRecord as exc:
        report.findings.append(Finding("hash chain", False, f"{exc}; not checked past it", seq=exc.seq))
    report.findings.append(walk.finding(report.head))
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


async def _verify_chain(
    js: JetStreamContext, last: int, on_progress: Progress | None, walk: CheckpointWalk, watch: anchor.Watch
) -> ChainHead:
    head = ChainHead()
    if last == 0:
        return head
    sub = await js.subscribe(
        subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        while head.seq < last:
            try:
                msg = await sub.next_msg(timeout=5)
            except TimeoutError:
                break  # nothing more will come: what is left unread is missing
            seq = msg.metadata.sequence.stream
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
    return head
