"""The chain's anchor outside itself: the router's last signed checkpoint, kept where
deleting the AUDIT stream does not reach.

A signed checkpoint in the log proves the chain up to it, but only while the log holds it:
an admin who deletes AUDIT gets a router that would start a fresh, valid chain. So each
time the router appends a checkpoint (and once per start, after it has read the log) it
also writes that checkpoint, as an :class:`Anchor`, to two places: the ``chain`` bucket
(key ``head``, with history) and a file beside its signing key (``var/keys/router.anchor``).
Someone who deletes AUDIT may delete the bucket too; the file is on another machine's disk.

:func:`compare` says whether a stream still holds an anchored checkpoint. The router
refuses to serve a stream that does not (``router/app.py``); ``agentctl audit verify``
reports it (``bus/verify.py``). An operator who reset the log on purpose starts the router
once with ``--accept-new-chain``: it appends a checkpoint record with code
:data:`RESTART_CODE` whose reason names the anchor it supersedes, so the break is itself
in the chain, signed by the next checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ledgerbus.bus import codec, durable, subjects
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.records import AuditRecord, Checkpoint

RESTART_CODE = "chain_restarted"
"""The ``code`` of the checkpoint record with which an operator accepted a new chain."""


class Anchor(msgspec.Struct, frozen=True, kw_only=True):
    """The last checkpoint the router signed, and where in which stream it stood.

    ``seq`` is the record that carries the checkpoint (``covers_seq + 1``); the stream's
    creation time tells a stream made again with the same records (a restore) from the
    one the checkpoint was written to.
    """

    seq: int
    checkpoint: Checkpoint
    stream_created: datetime | None = None
    written_at: datetime | None = None

    @property
    def token(self) -> str:
        """The anchor in one line, exact enough that a restart record can name it."""
        cp = self.checkpoint
        return f"checkpoint at seq {self.seq} covering seq {cp.covers_seq} head {cp.chain_head} key {cp.key_id}"

    def describe(self) -> str:
        """For people: which checkpoint, over which head, signed when and by which key."""
        cp = self.checkpoint
        at = f" at {cp.at.isoformat()}" if cp.at is not None else ""
        return (f"checkpoint at seq {self.seq} covering seq {cp.covers_seq} with head {cp.chain_head}, "
                f"signed{at} by key {cp.key_id}")


_decoder = msgspec.json.Decoder(Anchor)


class AnchorError(ConfigError):
    """An anchor could not be read or written (a file that does not decode, a bucket gone)."""


def file_path(key_path: Path) -> Path:
    """Where the router keeps the anchor of the key at ``key_path``: beside it."""
    return key_path.with_suffix(".anchor")


def decode(data: bytes, where: str) -> Anchor:
    """An anchor from its stored bytes; :class:`AnchorError` naming ``where`` if it does not decode."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise AnchorError(f"the anchor in {where} does not decode: {exc}") from exc


def read_file(path: Path) -> Anchor | None:
    """The anchor in ``path``; ``None`` if there is no file (a fresh install)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AnchorError(f"cannot read the anchor {path}: {exc.strerror}") from exc
    return decode(data, f"file {path}")


def write_file(path: Path, anchor: Anchor) -> None:
    """Replace the anchor in ``path`` atomically and durably.

    Written to a temporary file in the same directory, fsynced, renamed over the old one,
    and the directory fsynced: after a crash the file holds the old anchor or the new one,
    never half of either.
    """
    try:
        durable.replace(path, codec.encode(anchor), mode=0o600)
    except OSError as exc:
        raise AnchorError(f"cannot write the anchor {path}: {exc.strerror}") from exc


BUCKET_SOURCE = f"bucket {subjects.CHAIN_BUCKET}"


async def read_bucket(js: JetStreamContext) -> Anchor | None:
    """The anchor in the ``chain`` bucket; ``None`` if it holds none yet. A missing bucket
    is an :class:`AnchorError`: the router makes it at start, so someone deleted it."""
    try:
        kv = await js.key_value(subjects.CHAIN_BUCKET)
        entry = await kv.get(subjects.CHAIN_HEAD_KEY)
    except nats.js.errors.BucketNotFoundError as exc:
        raise AnchorError(f"the {BUCKET_SOURCE} does not exist (deleted?)") from exc
    except nats.js.errors.KeyNotFoundError:
        return None
    except nats.js.errors.NotFoundError as exc:
        # The stream info said no such stream: the bucket, not the key, is missing.
        raise AnchorError(f"the {BUCKET_SOURCE} does not exist (deleted?)") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise AnchorError(f"cannot read the {BUCKET_SOURCE}: {exc or type(exc).__name__}") from exc
    return decode(entry.value or b"", BUCKET_SOURCE)


async def write_bucket(js: JetStreamContext, anchor: Anchor, bucket: KeyValue | None = None) -> KeyValue:
    """Put ``anchor`` as the newest value of ``head`` in the ``chain`` bucket (which keeps
    the ones before it as history). Returns the bucket, for the next write to skip looking
    it up again (``bucket``)."""
    try:
        if bucket is None:
            bucket = await js.key_value(subjects.CHAIN_BUCKET)
        await bucket.put(subjects.CHAIN_HEAD_KEY, codec.encode(anchor))
    except (nats.errors.Error, TimeoutError) as exc:
        raise AnchorError(f"cannot write the {BUCKET_SOURCE}: {exc or type(exc).__name__}") from exc
    return bucket


@dataclass(frozen=True, slots=True)
class Read:
    """What one place an anchor is kept held: an anchor, nothing yet, or a ``problem``."""

    source: str
    anchor: Anchor | None = None
    problem: str = ""


async def read_bucket_for_verify(js: JetStreamContext) -> Read:
    """The bucket's anchor as a verifier sees it: a missing bucket is a problem to report."""
    try:
        return Read(BUCKET_SOURCE, await read_bucket(js))
    except AnchorError as exc:
        return Read(BUCKET_SOURCE, problem=str(exc))


def read_file_for_verify(path: Path, required: bool) -> Read | None:
    """The file's anchor as a verifier sees it; no file is ``None`` unless ``required`` (a
    verifier away from the router's disk has none to read)."""
    source = f"file {path}"
    try:
        found = read_file(path)
    except AnchorError as exc:
        return Read(source, problem=str(exc))
    if found is None:
        return Read(source, problem=f"no anchor at {path}") if required else None
    return Read(source, found)


@dataclass(slots=True)
class Watch:
    """Looks at each record while a reader verifies the chain, keeping what :func:`compare`
    needs: the records at the anchored sequences, and every operator-accepted restart."""

    wanted: set[int] = field(default_factory=set)
    found: dict[int, AuditRecord] = field(default_factory=dict)
    restarts: list[AuditRecord] = field(default_factory=list)

    @classmethod
    def of(cls, anchors: Iterable[Anchor]) -> Watch:
        """A watch for the records ``anchors`` name."""
        return cls(wanted={a.seq for a in anchors})

    def record(self, record: AuditRecord) -> None:
        """Look at one record just verified."""
        if record.seq in self.wanted:
            self.found[record.seq] = record
        if record.checkpoint is not None and record.code == RESTART_CODE:
            self.restarts.append(record)


@dataclass(frozen=True, slots=True)
class Comparison:
    """What the stream says about one anchor: ``ok`` if it still holds the anchored
    checkpoint, or an accepted restart supersedes it; ``seq`` is the first bad sequence."""

    ok: bool
    detail: str
    seq: int = 0
    superseded_at: int = 0
    """The seq of the restart record that accepted a new chain in place of this anchor."""


def restart_reason(anchors: Iterable[tuple[str, Anchor]]) -> str:
    """The reason of the record with which an operator accepts a new chain: every anchor
    (by source) it supersedes, exactly, so a later reader can match them."""
    named = "; ".join(f"{source}: {a.token}" for source, a in anchors)
    return f"the operator accepted a new chain (agentctl router --accept-new-chain), superseding {named}"


def compare(anchor: Anchor, head: ChainHead, watch: Watch, created: datetime | None = None,
            source: str = "the anchor") -> Comparison:
    """Whether a stream whose verified chain ends at ``head`` (read through ``watch``, made
    at ``created``) still holds the checkpoint ``anchor`` names."""
    for restart in watch.restarts:
        if anchor.token in restart.reason:
            return Comparison(True, f"the chain restarted at seq {restart.seq}, accepted by the operator in place "
                                    f"of the {anchor.describe()} ({source})", superseded_at=restart.seq)
    says = f"the chain restarted: {source} says {anchor.describe()}"
    remade = ""
    if created is not None and anchor.stream_created is not None and created != anchor.stream_created:
        remade = f"; AUDIT was made at {created.isoformat()}, the anchored one at {anchor.stream_created.isoformat()}"
    if head.seq < anchor.seq:
        has = "is empty" if head.seq == 0 else f"has only {head.seq} records (head {head.hash})"
        return Comparison(False, f"{says}; the stream {has}{remade}", seq=head.seq + 1)
    record = watch.found.get(anchor.seq)
    if record is None:
        return Comparison(False, f"{says}; the stream's record {anchor.seq} was not read", seq=anchor.seq)
    if record.checkpoint != anchor.checkpoint or record.prev_hash != anchor.checkpoint.chain_head:
        return Comparison(False, f"{says}; the stream's record {anchor.seq} is {_describe(record)}{remade}",
                          seq=anchor.seq)
    note = f" (AUDIT was made again at {created.isoformat()} with the same records)" if remade and created else ""
    return Comparison(True, f"the stream holds the {anchor.describe()} ({source}){note}")


def _describe(record: AuditRecord) -> str:
    cp = record.checkpoint
    if cp is not None:
        return (f"another checkpoint, covering seq {cp.covers_seq} with head {cp.chain_head} "
                f"by key {cp.key_id}")
    return f"a {record.kind} record from {record.principal} following hash {record.prev_hash}"
