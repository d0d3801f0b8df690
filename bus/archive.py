"""The audit archive: the records that left the live AUDIT stream under the retention rule.

A directory (``[retention] archive_dir`` of ``policy.toml``) holds one gzip file of JSON lines
per segment, ``audit-<first seq>-<last seq>.jsonl.gz`` (12 digits each), each line a record's
exact stored bytes, so re-hashing a segment reproduces the chain; and ``manifest.json``,
the router's signed seal of each segment (:class:`ArchiveSeal`), in order, and the seals of
the segments deleted under the archive's own retention (``expired``). Only the router writes
it (``router/retention.py``); every reader of the log reads it through :func:`records` when
it needs records AUDIT no longer holds. See docs/architecture.md, Retention and archives.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

from ledgerbus.bus import chain, durable, signing
from ledgerbus.bus.agent_policy import read_table
from ledgerbus.bus.errors import BusError, ChainError, UnreadableRecord
from ledgerbus.bus.records import ArchiveSeal
from ledgerbus.bus.settings import Settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZES = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` (``"0"``: none)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None or (not m.group(2) and float(m.group(1)) != 0):
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 12h, 7d or 0")
    return float(m.group(1)) * _UNITS.get(m.group(2), 1)


def parse_size(text: str) -> int:
    """Bytes in ``"512MiB"``, ``"10GB"``, ``"1048576"`` (``"0"``: no limit)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if m is None or m.group(2).upper() not in _SIZES:
        raise ValueError(f"{text!r} is not a size like 512MiB, 10GB or 0")
    return int(float(m.group(1)) * _SIZES[m.group(2).upper()])


class RetentionRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[retention]`` table of ``policy.toml``: how long AUDIT keeps records live, and
    the archive they go to (docs/operations.md, Retention and archives)."""

    audit_max_age: str = "7d"
    """a record older than this leaves the live stream, into the archive ("0": no age limit)"""
    audit_max_bytes: str = "0"
    """or, past this size of AUDIT, the oldest records leave ("0": no size limit)"""
    segment_records: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000
    """records per archive segment; records leave the stream in whole segments"""
    archive_dir: str = "var/archive"
    """where the segments and their manifest are written (relative to the project)"""
    archive_max_age: str = "90d"
    """a segment whose newest record is older than this is deleted ("0": kept for ever)"""
    check_every: str = "60s"
    """how often the leader router looks for records due"""

    def __post_init__(self) -> None:
        # Each error names its key: msgspec places a __post_init__ error at the table.
        for name, parse in (("audit_max_age", parse_duration), ("archive_max_age", parse_duration),
                            ("check_every", parse_duration), ("audit_max_bytes", parse_size)):
            try:
                parse(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        if parse_duration(self.check_every) <= 0:
            raise ValueError("check_every: must be more than 0")

    @property
    def max_age_s(self) -> float:
        return parse_duration(self.audit_max_age)

    @property
    def max_bytes(self) -> int:
        return parse_size(self.audit_max_bytes)

    @property
    def archive_max_age_s(self) -> float:
        return parse_duration(self.archive_max_age)

    @property
    def check_every_s(self) -> float:
        return parse_duration(self.check_every)

    @property
    def enabled(self) -> bool:
        """Whether anything ever leaves the live stream."""
        return self.max_age_s > 0 or self.max_bytes > 0


MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
"""Held while a manifest is checked and replaced (``Archive.write_manifest``)."""
FORMAT_VERSION = 1


class ArchiveError(BusError):
    """The archive cannot give what was asked: a segment missing, altered or unreadable."""


class Manifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the archive holds: the seals of its segments, oldest first, and of those
    deleted under the archive's retention (their files gone, their chain links kept)."""

    version: int = FORMAT_VERSION
    segments: list[ArchiveSeal] = msgspec.field(default_factory=list)
    expired: list[ArchiveSeal] = msgspec.field(default_factory=list)

    @property
    def last_seq(self) -> int:
        """The last record archived (0: none)."""
        seals = self.segments or self.expired
        return seals[-1].last_seq if seals else 0

    @property
    def last_hash(self) -> str:
        """The hash of the last record archived (empty: none)."""
        seals = self.segments or self.expired
        return seals[-1].last_hash if seals else ""

    def covering(self, first: int, last: int) -> list[ArchiveSeal]:
        """The segments holding records ``first..last``, in order; :class:`ArchiveError`
        naming the range no segment holds (expired, or missing from the manifest)."""
        out: list[ArchiveSeal] = []
        seq = first
        for seal in self.segments:
            if seal.last_seq < seq:
                continue
            if seal.first_seq > seq:
                break
            out.append(seal)
            seq = seal.last_seq + 1
            if seq > last:
                return out
        if seq <= last:
            end = min(last, next((s.first_seq - 1 for s in self.segments if s.first_seq > seq), last))
            gone = any(s.first_seq <= seq <= s.last_seq for s in self.expired)
            why = "expired under the archive's retention" if gone else "no segment in the archive holds them"
            raise ArchiveError(f"records {seq}..{end} are not in the live stream and {why}")
        return out


@dataclass(frozen=True)
class Archive:
    """One archive directory."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> Manifest:
        """The manifest (empty if there is none yet); :class:`ArchiveError` if it does not decode."""
        try:
            data = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return Manifest()
        except OSError as exc:
            raise ArchiveError(f"{self.manifest_path}: {exc.strerror}") from exc
        try:
            manifest = msgspec.json.decode(data, type=Manifest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ArchiveError(f"{self.manifest_path} cannot be read: {exc}") from exc
        if manifest.version != FORMAT_VERSION:
            raise ArchiveError(f"{self.manifest_path} is format {manifest.version}; this version reads {FORMAT_VERSION}")
        return manifest

    def write_manifest(self, manifest: Manifest, over: Manifest | None = None) -> None:
        """Replace the manifest atomically (a temporary file, fsynced, renamed).

        With ``over``, the manifest this one was made from: only if that is still the one
        on disk, checked and replaced under a lock on the directory, else
        :class:`ArchiveError`. A router that lost its lease mid-round goes on writing in its
        thread after the new leader's rounds, which may have recorded a cut and purged
        below it: its stale manifest must not drop their seals.
        """
        data = msgspec.json.format(msgspec.json.encode(manifest))
        if over is None:
            durable.replace(self.manifest_path, data)
            return
        with (self.path / LOCK).open("ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.manifest()
            if current != over:
                raise ArchiveError(f"{self.manifest_path} changed since this round read it (another router wrote "
                                   f"it, through seq {current.last_seq}): not writing over it")
            durable.replace(self.manifest_path, data)

    def segment_path(self, seal: ArchiveSeal) -> Path:
        return self.path / seal.file

    def write_segment(self, records: list[tuple[int, bytes]]) -> tuple[str, str, int]:
        """Write records ``(seq, stored bytes)``, contiguous, as one segment file; return
        its name, sha256 and size. Written to a temporary name, fsynced, then renamed."""
        first, last = records[0][0], records[-1][0]
        name = segment_name(first, last)
        body = gzip.compress(b"\n".join(data for _, data in records) + b"\n", compresslevel=6, mtime=0)
        durable.replace(self.path / name, body)
        return name, hashlib.sha256(body).hexdigest(), len(body)

    def read_segment(self, seal: ArchiveSeal) -> list[tuple[int, bytes]]:
        """The records of one segment, ``(seq, stored bytes)``, after checking the file is
        the one sealed (its sha256) and holds exactly the sealed range."""
        path = self.segment_path(seal)
        try:
            body = path.read_bytes()
        except FileNotFoundError as exc:
            raise ArchiveError(f"segment {seal.file} (records {seal.first_seq}..{seal.last_seq}) is missing "
                               f"from {self.path}") from exc
        except OSError as exc:
            raise ArchiveError(f"segment {path}: {exc.strerror}") from exc
        if hashlib.sha256(body).hexdigest() != seal.sha256:
            raise ArchiveError(f"segment {seal.file} (records {seal.first_seq}..{seal.last_seq}) was changed: "
                               "its sha256 is not the sealed one")
        try:
            lines = gzip.decompress(body).split(b"\n")
        except (OSError, EOFError) as exc:
            raise ArchiveError(f"segment {seal.file} does not decompress: {exc}") from exc
        if lines and lines[-1] == b"":
            lines.pop()
        if len(lines) != seal.last_seq - seal.first_seq + 1:
            raise ArchiveError(f"segment {seal.file} holds {len(lines)} records, sealed as "
                               f"{seal.last_seq - seal.first_seq + 1}")
        return [(seal.first_seq + i, line) for i, line in enumerate(lines)]

    def check(self, public_key: str | None) -> Iterator[tuple[ArchiveSeal, str]]:
        """Each segment with what is wrong with it ("" if nothing): its seal signed by the
        router's key (``public_key``, hex; None: not checked), its file there and unchanged,
        its records chained from the sealed link to the sealed hash, and linked to the
        segment before. The segments deleted under the archive's retention are only linked."""
        manifest = self.manifest()
        previous: ArchiveSeal | None = manifest.expired[-1] if manifest.expired else None
        for seal in manifest.segments:
            yield seal, self._problem(seal, previous, public_key)
            previous = seal

    def _problem(self, seal: ArchiveSeal, previous: ArchiveSeal | None, public_key: str | None) -> str:
        if public_key is not None and not signing.valid(public_key, seal):
            return "its seal is not signed by the router's key"
        expected = previous.last_seq + 1 if previous is not None else 1
        if seal.first_seq != expected:
            return f"records {expected}..{seal.first_seq - 1} before it are in no segment"
        link = previous.last_hash if previous is not None else chain.GENESIS
        if seal.prev_hash != link:
            return f"it does not link to {previous.file if previous is not None else 'the start of the chain'}"
        try:
            head = chain.ChainHead(seal.first_seq - 1, seal.prev_hash)
            for seq, data in self.read_segment(seal):
                _, head = chain.verify_next(seq, data, head)
        except (ArchiveError, ChainError, UnreadableRecord) as exc:
            return str(exc)
        if head.hash != seal.last_hash:
            return "its records do not end at the sealed hash"
        return ""

    def records(self, first: int, last: int) -> Iterator[tuple[int, bytes]]:
        """Records ``first..last`` from the segments, in order (:class:`ArchiveError` if
        any is not there)."""
        for seal in self.manifest().covering(first, last):
            for seq, data in self.read_segment(seal):
                if first <= seq <= last:
                    yield seq, data


def configured(settings: Settings) -> tuple[Archive, RetentionRule]:
    """The project's archive and the retention rule that fills it (``policy.toml``)."""
    rule = read_table(settings.policy_path, "retention", RetentionRule)
    return Archive(settings.in_home(Path(rule.archive_dir))), rule


def segment_name(first: int, last: int) -> str:
    return f"audit-{first:012d}-{last:012d}.jsonl.gz"

