"""Projection snapshots: the projection database at a log position, kept in the
``projections`` object store, so that a projector with no database file, and ``agentctl
replay``, apply only the records after the newest one that checks instead of the whole log.

**Saving** (:class:`Saver`, in the projector): every ``projection_snapshot_every`` records
the projector copies its database (``VACUUM INTO`` from a read-only connection of its own, in
a thread: one read transaction, so the tables and the tracking row agree at a committed
position P), compresses the copy and writes it in the background as ``projection-<P, 12
digits>`` (:mod:`projections.snapfile` has the layout). One write at a time; the projector's
loop never waits for it. The newest ``projection_snapshot_keep`` are kept. Several projectors
in a queue group share the store: one that finds a snapshot fewer than ``every`` records
older than its own position, or one at the same position, writes nothing.

**Loading** (:func:`restore`): the snapshots newest first, the first that passes every check:
its format version is known; its projection schema version is this one's; it was built with
the memory list cap asked for; AUDIT reaches P, and AUDIT's stored record at P, re-hashed,
has the hash the snapshot names (:func:`record_hash`; if AUDIT no longer holds record P, the
check is skipped and the warning ``projection_snapshot_unverified`` says why); its body
hashes to its digest; the body decompresses to a database that passes SQLite's
``quick_check`` and holds what the header says. One that fails is named in a warning
(``projection_snapshot_rejected``) and the next older one is tried.

**The tail** after P must be in AUDIT: :func:`check_tail` is the one place that decides it
(and where reading archived records will come in).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from ledgerbus.bus import chain, codec, failpoints, subjects
from ledgerbus.bus.cancel import stop_task
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.errors import ChainError, LedgerbusError, UnreadableRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import snapfile
from ledgerbus.projections.errors import DatabaseError, LogGapError, SnapshotRejected

log = structlog.get_logger(__name__)

PREFIX = "projection-"
"""Object names: ``projection-<position, 12 digits>``, so names sort by position."""
BUCKET = subjects.PROJECTION_BUCKET
ORPHAN_AGE_S = 300.0
"""Chunks no entry names are purged once their newest is this old: younger ones may be a
write another projector has in flight (its entry comes after its last chunk)."""
_SCRATCH = ".snapshot-"


def name_of(position: int) -> str:
    """The object name of the snapshot at ``position``."""
    return f"{PREFIX}{position:012d}"


def position_of(name: str) -> int | None:
    """The position an object name says, or ``None`` for a name that is not a snapshot's."""
    digits = name.removeprefix(PREFIX)
    return int(digits) if name.startswith(PREFIX) and len(digits) == 12 and digits.isdigit() else None


def scratch_dir(db_path: Path, what: str) -> tempfile.TemporaryDirectory[str]:
    """A directory beside ``db_path`` (the same file system, room like the file's) for a
    snapshot being made or read; :func:`clean_scratch` removes what a crash left."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=db_path.parent, prefix=f".{db_path.name}{_SCRATCH}{what}-")


def clean_scratch(db_path: Path) -> None:
    """Remove the scratch directories a killed projector left beside ``db_path`` (and
    beside a file it was restoring into, ``<name>.restoring``)."""
    for leftover in db_path.parent.glob(f".{db_path.name}*{_SCRATCH}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _records(first: int, last: int) -> str:
    return f"record {first} is" if first == last else f"records {first}..{last} are"


def check_tail(position: int, first_seq: int) -> None:
    """Raise :class:`LogGapError` unless AUDIT (whose first record is ``first_seq``) holds
    every record after ``position``. The one place that decides whether a projection can
    go on from the stream alone."""
    if position + 1 < first_seq:
        raise LogGapError(f"AUDIT starts at seq {first_seq}; this projection is at seq {position}: "
                          f"{_records(position + 1, first_seq - 1)} in the archive", position, first_seq)


def check_next(position: int, seq: int) -> None:
    """Raise :class:`LogGapError` if the record delivered after ``position`` is not the next
    one (records between them were purged while the projection followed the stream)."""
    if seq > position + 1:
        raise LogGapError(f"AUDIT's next record after seq {position} is seq {seq}: {_records(position + 1, seq - 1)} "
                          "no longer in the stream (archived and purged)", position, seq)


async def record_hash(js: JetStreamContext, seq: int) -> str | None:
    """The hash of the record AUDIT holds at ``seq``, checked on its own (it re-hashes from
    its ``prev_hash`` and its bytes are canonical), or ``None`` if AUDIT does not hold it.
    :class:`ChainError` or :class:`UnreadableRecord` for a record that does not check."""
    try:
        msg = await js.get_msg(subjects.AUDIT_STREAM, seq)
    except nats.js.errors.NotFoundError:
        return None
    data = msg.data or b""
    prev = codec.read_record(seq, data).prev_hash
    record, _ = chain.verify_next(seq, data, ChainHead(seq - 1, prev))
    return record.hash


@dataclass(frozen=True, slots=True)
class Restored:
    """The snapshot a database was started from."""

    name: str
    position: int
    newest_at: str | None


async def _list(store: ObjectStore) -> list[Any]:
    """The store's entries (none: an empty list, where nats-py raises)."""
    try:
        return await store.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        return []


async def positions(js: JetStreamContext) -> list[int]:
    """The positions of the stored snapshots, oldest first."""
    store = await js.object_store(BUCKET)
    return sorted(p for i in await _list(store) if (p := position_of(i.name)) is not None)


async def restore(js: JetStreamContext, dest: Path, memory_list_cap: int | None, until_seq: int | None = None,
                  until_time: datetime | None = None) -> Restored | None:
    """Write the database of the newest snapshot that checks to ``dest`` (which must not
    exist) and say which it was; ``None`` if there is none (``dest`` is not made).

    Only a snapshot at or before ``until_seq``, whose newest record is at or before
    ``until_time``, and whose tail AUDIT holds (:func:`check_tail`) is considered; of
    those, one that fails a check is logged and passed over (see the module's docstring).
    """
    if dest.exists():
        raise FileExistsError(f"{dest} exists; a snapshot is restored into a new file")
    try:
        store = await js.object_store(BUCKET)
        infos = await _list(store)
        state = (await js.stream_info(subjects.AUDIT_STREAM)).state
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("projection_snapshots_unreadable", error=str(exc) or type(exc).__name__)
        return None
    found = sorted(((p, i) for i in infos if (p := position_of(i.name)) is not None), key=lambda pi: -pi[0])
    for position, info in found:
        if until_seq is not None and position > until_seq:
            continue
        try:
            check_tail(position, state.first_seq)
        except LogGapError as exc:
            log.info("projection_snapshot_passed_over", name=info.name, reason=str(exc))
            break  # the older ones are further behind
        try:
            with scratch_dir(dest, "restore") as tmp:
                stored = Path(tmp) / "snapshot"
                await _download(store, info, stored)
                header = await _check(js, info.name, stored, memory_list_cap, state.last_seq, state.first_seq)
                if until_time is not None and not _at_or_before(header.newest_at, until_time):
                    log.info("projection_snapshot_passed_over", name=info.name,
                             reason=f"its newest record is at {header.newest_at}, past {until_time.isoformat()}")
                    continue
                db = Path(tmp) / "projection.db"
                await asyncio.to_thread(snapfile.unpack, stored, db)
                for suffix in ("-wal", "-shm"):  # a WAL left by a file that is gone would be applied to this one
                    dest.with_name(dest.name + suffix).unlink(missing_ok=True)
                os.replace(db, dest)
        except SnapshotRejected as exc:
            log.warning("projection_snapshot_rejected", name=info.name, reason=str(exc))
            continue
        log.info("projection_snapshot_loaded", name=info.name, position=header.position, db_bytes=header.db_bytes)
        return Restored(info.name, header.position, header.newest_at)
    return None


def _at_or_before(newest_at: str | None, until_time: datetime) -> bool:
    """Whether a snapshot whose newest record is at ``newest_at`` is within ``until_time``."""
    try:
        return newest_at is not None and datetime.fromisoformat(newest_at) <= until_time
    except ValueError as exc:
        raise SnapshotRejected(f"its header's newest time {newest_at!r} is not a time") from exc


async def _download(store: ObjectStore, info: Any, path: Path) -> None:
    """The object into a file (not memory: a projection can be large); a read that stalls,
    say on chunks a concurrent prune purged, is given up after a while."""
    try:
        with path.open("wb") as out:
            await asyncio.wait_for(store.get(info.name, writeinto=out),  # type: ignore[arg-type]
                                   60 + (info.size or 0) / 2e6)
    except (nats.errors.Error, TimeoutError) as exc:
        raise SnapshotRejected(f"it cannot be read: {exc or type(exc).__name__}") from exc


async def _check(js: JetStreamContext, name: str, stored: Path, memory_list_cap: int | None, last_seq: int,
                 first_seq: int) -> snapfile.Header:
    """The checks before the body is touched: the header, and its tie to AUDIT."""
    with stored.open("rb") as f:
        header = snapfile.read_header(f)
    snapfile.check_header(header, memory_list_cap)
    if header.position != position_of(name):
        raise SnapshotRejected(f"its header says seq {header.position}, its name another")
    if header.position > last_seq:
        raise SnapshotRejected(f"it is at seq {header.position}, AUDIT ends at seq {last_seq}")
    try:
        stored_hash = await record_hash(js, header.position)
    except (ChainError, UnreadableRecord) as exc:
        raise SnapshotRejected(f"AUDIT's record at seq {header.position} does not check: {exc}") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise SnapshotRejected(f"AUDIT could not be read to check it: {exc or type(exc).__name__}") from exc
    if stored_hash is None:
        if header.position >= first_seq:
            raise SnapshotRejected(f"AUDIT holds no record at seq {header.position}")
        log.warning("projection_snapshot_unverified", name=name, position=header.position,
                    reason=f"AUDIT starts at seq {first_seq}: record {header.position} was archived, so its hash "
                           "was not compared")
    elif stored_hash != header.record_hash:
        raise SnapshotRejected(f"AUDIT's record at seq {header.position} has hash {stored_hash}, "
                               f"the snapshot says {header.record_hash}")
    return header


class _Upload(io.RawIOBase):
    """A snapshot's bytes as the object store reads them, chunk by chunk: the header, then
    the body from its file. Past the first chunk is the ``projector.snapshot_writing`` fail
    point (a write cut short by a crash)."""

    def __init__(self, header: bytes, body: io.BufferedReader) -> None:
        super().__init__()
        self._header = header
        self._body = body
        self._sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._sent:
            failpoints.reached("projector.snapshot_writing")
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._header))
        view[:n] = self._header[:n]
        self._header = self._header[n:]
        if n < len(view):
            n += self._body.readinto(view[n:]) or 0
        self._sent += n
        return n


@dataclass(frozen=True, slots=True)
class Saved:
    """A snapshot written (or found already written by another projector)."""

    name: str
    position: int
    bytes: int
    db_bytes: int
    existed: bool


async def write(js: JetStreamContext, db_path: Path, keep: int, tails: Mapping[int, str] | None = None,
                orphan_age_s: float = ORPHAN_AGE_S) -> Saved | None:
    """Copy the database at ``db_path`` and store the copy as the snapshot at the position
    it holds (``None``: it holds none yet); then keep the newest ``keep``.

    ``tails`` (position → hash of that record, as the projector applied it) names the
    record the copy ends with; a position it does not hold is looked up in AUDIT.
    """
    with scratch_dir(db_path, "write") as tmp:
        made = await asyncio.to_thread(snapfile.copy, db_path, Path(tmp) / "copy.db")
        if made.position == 0:
            return None
        tied = (tails or {}).get(made.position) or await record_hash(js, made.position)
        if tied is None:
            raise DatabaseError(f"AUDIT no longer holds record {made.position}, which the snapshot must name")
        body = Path(tmp) / "body"
        header = await asyncio.to_thread(snapfile.seal, made, tied, body)
        name = name_of(made.position)
        store = await js.object_store(BUCKET)
        try:
            await store.get_info(name)
            existed = True  # another projector of the queue group wrote it
        except nats.js.errors.NotFoundError:
            existed = False
        if not existed:
            with body.open("rb") as f:
                await store.put(name, _Upload(header, f))  # type: ignore[arg-type]
        size, db_bytes = len(header) + body.stat().st_size, made.path.stat().st_size
    await _prune(js, store, keep, orphan_age_s)
    return Saved(name, made.position, size, db_bytes, existed)


async def _prune(js: JetStreamContext, store: ObjectStore, keep: int, orphan_age_s: float) -> None:
    """Delete all but the newest ``keep`` snapshots (entry and chunks, leaving no
    tombstone), and chunks no entry names once they are :data:`ORPHAN_AGE_S` old (a
    write a crash cut short)."""
    infos = await _list(store)
    names = sorted((i.name for i in infos if position_of(i.name) is not None), reverse=True)
    stream = subjects.obj_stream(BUCKET)
    for name in names[keep:]:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # another projector deleted it first
            await store.delete(name)
        await js.purge_stream(stream, subject=subjects.obj_meta(BUCKET, name))
        log.info("projection_snapshot_deleted", name=name)
    named = {i.nuid for i in infos if i.name not in names[keep:]}
    chunks = subjects.obj_chunks(BUCKET)
    info = await js.stream_info(stream, subjects_filter=f"{chunks}{subjects.FULL_WILDCARD}")
    now = datetime.now(UTC)
    for subject in info.state.subjects or {}:
        if subject[len(chunks):] in named:
            continue
        newest = await js.get_last_msg(stream, subject)
        if newest.time is not None and (now - newest.time).total_seconds() < orphan_age_s:
            continue
        await js.purge_stream(stream, subject=subject)
        log.info("projection_snapshot_chunks_purged", subject=subject)


class Saver:
    """When the projector saves a snapshot, and writing it in the background."""

    def __init__(self, js: JetStreamContext, settings: Settings, db_path: Path) -> None:
        self.js = js
        self.db_path = db_path
        self.every = settings.projection_snapshot_every
        self.keep = max(1, settings.projection_snapshot_keep)
        self.orphan_age_s = ORPHAN_AGE_S
        self.saved = 0
        """The position of the newest snapshot known (written, loaded, or found stored)."""
        self._writing: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._backoff = 1.0

    @property
    def enabled(self) -> bool:
        """Whether snapshots are saved and loaded (``projection_snapshot_every`` > 0)."""
        return self.every > 0

    def maybe_save(self, position: int, tails: Mapping[int, str]) -> None:
        """The projector has committed ``position``: start a snapshot if ``every`` records
        passed since the newest known. Never raises; one still being written, or one that
        failed less than a backoff ago, puts the next off."""
        if not self.enabled or position - self.saved < self.every:
            return
        if self._writing is not None and not self._writing.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return
        self._writing = asyncio.create_task(self._save(position, dict(tails)))

    async def _save(self, position: int, tails: dict[int, str]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            newest = max(await positions(self.js), default=0)
            if position - newest < self.every:  # another projector of the group saved one
                self.saved = max(self.saved, newest)
                return
            saved = await write(self.js, self.db_path, self.keep, tails, self.orphan_age_s)
        except (nats.errors.Error, TimeoutError, OSError, sqlite3.Error, LedgerbusError) as exc:
            self._retry_at = loop.time() + self._backoff
            self._backoff = min(self._backoff * 2, 60.0)
            log.warning("projection_snapshot_write_failed", position=position, error=str(exc) or type(exc).__name__,
                        retry_in_s=round(self._retry_at - loop.time(), 1))
            return
        self._backoff = 1.0
        if saved is None:
            return
        self.saved = max(self.saved, saved.position)
        log.info("projection_snapshot_exists" if saved.existed else "projection_snapshot_saved", name=saved.name,
                 position=saved.position, bytes=saved.bytes, db_bytes=saved.db_bytes,
                 seconds=round(loop.time() - started, 3))

    async def stop(self, timeout: float = 30.0) -> None:
        """Wait for a write in flight (up to ``timeout``; then it is cancelled, and what
        it stored has no entry)."""
        if self._writing is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._writing), timeout)
        except TimeoutError:
            await stop_task(self._writing)  # one cancel can be lost in nats-py's wait_for
        self._writing = None
