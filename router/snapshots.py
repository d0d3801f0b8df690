"""Router snapshots: the folded state at a log position, signed, so that a start or a
takeover reads only the records after it instead of the whole log.

Every ``snapshot_every`` records the router forks at a batch boundary (the state exactly
after folding the chain head S, every record up to S acknowledged); the child encodes its
copy-on-write image of the :class:`RouterState`, and the router writes it in the
background to the ``snapshots`` object store: msgpack,
zlib-compressed, in an :class:`Envelope` whose Ed25519 signature (the router's checkpoint
key) covers the format version, the chain head (S and its hash) and the sha256 of the
compressed body. The newest ``snapshot_keep`` are kept.

At start the newest snapshot is used only if its format version is understood, it was
signed by this router's key, its body hashes to what was signed, the record stored in
AUDIT at S has the hash it names, and every anchored checkpoint at or before S is the
checkpoint record it saw there; otherwise the router says why (``snapshot_rejected``) and
tries the one before, and with none left folds the whole log, as without snapshots. The
chain is then verified from the snapshot's head over the tail (``router/audit.py``).

What is not kept, and why: ``dirty``, ``held``, ``ready_since`` and ``orphaned`` are the
scheduler's, and a full fold leaves ``held``, ``ready_since`` and ``orphaned`` empty, as a
load does; a load marks every task dirty, a superset of what a fold leaves (every task a
record touched, and at start every open one), which only makes the scheduler look at
tasks its decisions do not change. The ``seen.audited`` records are kept as (INGRESS seq,
AUDIT seq) pairs: only those of messages still in INGRESS matter after a start (the rest
are forgotten at once), and those are read back from AUDIT. The state's ``_recent`` (the
tasks an archive would look at) is derived from the tasks at load.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import io
import os
import signal
import zlib
from collections import OrderedDict
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from ledgerbus.bus import anchor, chain, codec, failpoints, signing, subjects
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.errors import ChainError, UnreadableRecord
from ledgerbus.bus.events import SkillUnmatched
from ledgerbus.bus.records import AuditRecord, Checkpoint
from ledgerbus.bus.settings import Settings
from ledgerbus.router.state import RouterState
from ledgerbus.router.tasks import AnyTask, PlanState, StepState, TaskState

log = structlog.get_logger(__name__)

FORMAT = 2
"""The snapshot format this router writes and reads; a snapshot of another is passed over.
(2: each task's ``last_seq`` and ``retryable``, and where the last archive cut the log.)"""

PREFIX = "router-"
"""Snapshot object names: ``router-<chain head seq, 12 digits>``, so names sort by position."""

_SIGNED_DOMAIN = b"ledgerbus router snapshot\x00"
_SHAPES: dict[type, int] = {TaskState: 0, PlanState: 1, StepState: 2}


class Envelope(msgspec.Struct, kw_only=True):
    """What is stored: the signed header and the compressed body."""

    version: int
    head_seq: int
    head_hash: str
    key_id: str
    digest: str
    """sha256 (hex) of ``body``."""
    signature: str
    """Ed25519 (hex) over :func:`_signed`."""
    body: bytes
    """A :class:`Body`, msgpack, zlib-compressed."""


class Body(msgspec.Struct, kw_only=True):
    """Everything :meth:`RouterState.apply` builds, at the chain head ``head_seq``."""

    head_seq: int
    head_hash: str
    shapes: bytes
    """One byte per task, in the state's order: 0 a task, 1 a plan, 2 a plan step (the
    three lists below hold them, each in the same order)."""
    task_ids: list[str]
    plain: list[TaskState]
    plans: list[PlanState]
    steps: list[StepState]
    last_checkpoint_seq: int
    last_checkpoint: Checkpoint | None
    checkpoint_hashes: dict[int, str]
    restarts: list[AuditRecord]
    checkpoints: dict[str, dict[str, int]]
    registry: dict[str, set[str]]
    proposals: dict[str, SkillUnmatched]
    approved_proposals: set[str]
    joined_at: dict[str, datetime]
    unmatched: set[str]
    inflight: dict[str, set[str]]
    timers: list[tuple[datetime, str]]
    audited: list[tuple[int, int]]
    """(INGRESS seq, AUDIT seq) of the state's ``seen.audited``, oldest first."""
    messages: list[tuple[str, int, datetime]]
    """(message id, seq, at) of the state's ``seen.messages``, oldest first."""
    archived_through: int = 0
    archived_tasks: int = 0


_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_body_decoder = msgspec.msgpack.Decoder(Body)
_encoder = msgspec.msgpack.Encoder()


class SnapshotRejected(Exception):
    """A snapshot that may not be started from; the message says why."""


def name_of(head_seq: int) -> str:
    """The object name of the snapshot at ``head_seq``."""
    return f"{PREFIX}{head_seq:012d}"


def encode_state(state: RouterState, head: ChainHead) -> bytes:
    """The state as a :class:`Body` (msgpack, not compressed): done on the event loop, at
    a batch boundary, since the state changes with the next batch."""
    tasks = state.tasks
    return _encoder.encode(Body(
        head_seq=head.seq, head_hash=head.hash,
        shapes=bytes(_SHAPES[type(t)] for t in tasks.values()), task_ids=list(tasks),
        plain=[t for t in tasks.values() if type(t) is TaskState],
        plans=[t for t in tasks.values() if type(t) is PlanState],
        steps=[t for t in tasks.values() if type(t) is StepState],
        last_checkpoint_seq=state.last_checkpoint_seq, last_checkpoint=state.last_checkpoint,
        checkpoint_hashes=state.checkpoint_hashes, restarts=state.restarts, checkpoints=state.checkpoints,
        registry=state.registry, proposals=state.proposals, approved_proposals=state.approved_proposals,
        joined_at=state.joined_at, unmatched=state.unmatched, inflight=state.inflight,
        timers=state._timers,
        audited=[(ingress, record.seq) for ingress, record in state.seen.audited.items()],
        messages=[(msg_id, seq, at) for msg_id, (seq, at) in state.seen.messages.items()],
        archived_through=state.archived_through, archived_tasks=state.archived_tasks,
    ))


def _signed(version: int, head_seq: int, head_hash: str, digest: str) -> bytes:
    return _SIGNED_DOMAIN + _encoder.encode([version, head_seq, head_hash, digest])


def seal(key: Ed25519PrivateKey, raw: bytes, head: ChainHead) -> bytes:
    """Compress and sign an encoded state (CPU work: run off the event loop)."""
    return seal_body(key, zlib.compress(raw, 1), head)


def seal_body(key: Ed25519PrivateKey, body: bytes, head: ChainHead) -> bytes:
    """Sign a compressed encoded state into its :class:`Envelope`."""
    digest = hashlib.sha256(body).hexdigest()
    signature = key.sign(_signed(FORMAT, head.seq, head.hash, digest)).hex()
    return _encoder.encode(Envelope(version=FORMAT, head_seq=head.seq, head_hash=head.hash,
                                    key_id=signing.key_id(signing.public_hex(key)), digest=digest,
                                    signature=signature, body=body))


def _fork_encode(state: RouterState, head: ChainHead) -> tuple[int, int]:
    """Fork a child that encodes and compresses ``state`` and writes it to a pipe, then
    exits; return its pid and the pipe's read end. The child runs nothing but that (no
    event loop, no logging, no exit handlers: ``os._exit``), so what the parent's other
    threads held at the fork does not matter to it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read)
            body = zlib.compress(encode_state(state, head), 1)
            with os.fdopen(write, "wb") as out:
                out.write(body)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def _collect(pid: int, read: int) -> bytes:
    """The compressed state the child ``pid`` writes to ``read`` (blocking: run in a thread)."""
    chunks = []
    try:
        while chunk := os.read(read, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise OSError(f"the snapshot encoder (pid {pid}) failed with status {status}")
    return b"".join(chunks)


def open_envelope(data: bytes, public: str) -> tuple[Envelope, Body]:
    """Check a stored snapshot on its own (version, key, signature, digest) and decode it;
    :class:`SnapshotRejected` naming what failed."""
    try:
        env = _envelope_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SnapshotRejected(f"it does not decode: {exc}") from exc
    if env.version != FORMAT:
        raise SnapshotRejected(f"format version {env.version}, this router reads version {FORMAT}")
    if env.key_id != signing.key_id(public):
        raise SnapshotRejected(f"signed by key {env.key_id}, not by this router's key {signing.key_id(public)}")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
            bytes.fromhex(env.signature), _signed(env.version, env.head_seq, env.head_hash, env.digest))
    except (InvalidSignature, ValueError) as exc:
        raise SnapshotRejected("its signature does not verify with this router's key") from exc
    if hashlib.sha256(env.body).hexdigest() != env.digest:
        raise SnapshotRejected("its body does not hash to the signed digest (altered or damaged)")
    try:
        body = _body_decoder.decode(zlib.decompress(env.body))
    except (zlib.error, msgspec.DecodeError) as exc:
        raise SnapshotRejected(f"its body does not decode: {exc}") from exc
    if (body.head_seq, body.head_hash) != (env.head_seq, env.head_hash):
        raise SnapshotRejected("its body names another chain head than its signed header")
    return env, body


def restore(body: Body, audited: dict[int, AuditRecord], dedup_horizon_s: float,
            dedup_max_ids: int = 200_000) -> RouterState:
    """The state a snapshot holds; ``audited`` are the records (by AUDIT seq) of the
    ``seen.audited`` entries to keep (those of messages still in INGRESS)."""
    state = RouterState(dedup_horizon_s=dedup_horizon_s, dedup_max_ids=dedup_max_ids)
    shapes: list[list[AnyTask]] = [list(body.plain), list(body.plans), list(body.steps)]
    iters = [iter(s) for s in shapes]
    state.tasks = {task_id: next(iters[shape]) for task_id, shape in zip(body.task_ids, body.shapes, strict=True)}
    state.last_checkpoint_seq, state.last_checkpoint = body.last_checkpoint_seq, body.last_checkpoint
    state.checkpoint_hashes, state.restarts = body.checkpoint_hashes, body.restarts
    state.checkpoints, state.registry, state.proposals = body.checkpoints, body.registry, body.proposals
    state.approved_proposals, state.joined_at, state.unmatched = body.approved_proposals, body.joined_at, body.unmatched
    state.inflight = body.inflight
    state.archived_through, state.archived_tasks = body.archived_through, body.archived_tasks
    # The tasks touched since the last archive's cut, as a fold leaves them: by seq, ties in
    # the order the tasks were made (a plan before its steps).
    state._recent = OrderedDict((task_id, task.last_seq) for task_id, task in sorted(
        ((task_id, task) for task_id, task in state.tasks.items() if task.last_seq > state.archived_through),
        key=lambda item: item[1].last_seq))
    state._timers = list(body.timers)
    heapq.heapify(state._timers)
    state.seen.audited = OrderedDict((ingress, audited[seq]) for ingress, seq in body.audited if seq in audited)
    state.seen.messages = OrderedDict((msg_id, (seq, at)) for msg_id, seq, at in body.messages)
    # The scheduler looks at every task once (see the module's docstring).
    state.dirty = set(state.tasks)
    return state


class _Chunks(io.RawIOBase):
    """The snapshot's bytes as the object store reads them, chunk by chunk; past the first
    chunk is the ``router.snapshot_writing`` fail point (a write cut short by a crash)."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        if self._pos:
            failpoints.reached("router.snapshot_writing")
        n = min(len(buffer), len(self._view) - self._pos)
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


async def _stored_record(js: JetStreamContext, seq: int) -> AuditRecord:
    """The record stored in AUDIT at ``seq``, checked on its own (its hash recomputes from
    its ``prev_hash``, its bytes are canonical); :class:`SnapshotRejected` if not."""
    try:
        msg = await js.get_msg(subjects.AUDIT_STREAM, seq)
    except nats.js.errors.NotFoundError as exc:
        raise SnapshotRejected(f"AUDIT holds no record at seq {seq}") from exc
    data = msg.data or b""
    try:
        prev = codec.read_record(seq, data).prev_hash
        record, _ = chain.verify_next(seq, data, ChainHead(seq - 1, prev))
    except (ChainError, UnreadableRecord) as exc:
        raise SnapshotRejected(f"AUDIT's record at seq {seq} does not check: {exc}") from exc
    return record


class Snapshots:
    """When to save a snapshot, writing it in the background, and loading the newest valid one."""

    def __init__(self, js: JetStreamContext, settings: Settings, key: Ed25519PrivateKey) -> None:
        self.js = js
        self.key = key
        self.public = signing.public_hex(key)
        self.every = settings.snapshot_every
        self.keep = max(1, settings.snapshot_keep)
        self.dedup_horizon_s = settings.dedup_horizon_s
        self.dedup_max_ids = settings.dedup_max_ids
        self.saved_seq = 0
        """The chain head of the newest snapshot written or loaded (or being written)."""
        self._writing: asyncio.Task[None] | None = None
        self._child: int | None = None
        """The pid of the last encoder child forked."""
        self._retry_at = 0.0
        self._backoff = 1.0

    @property
    def enabled(self) -> bool:
        """Whether snapshots are saved and loaded (``snapshot_every`` > 0)."""
        return self.every > 0

    def maybe_save(self, state: RouterState, head: ChainHead) -> None:
        """At a batch boundary (``state`` is exactly the fold up to ``head``): start a
        snapshot if ``snapshot_every`` records passed since the last. Never raises; a
        write still in flight, or one that failed less than a backoff ago, puts the next
        one off to a later boundary.

        The state is encoded by a forked child (:func:`_fork_encode`), which holds a
        copy-on-write image of it as it is now: the router pauses only for the fork, not
        for an encoding that grows with every task the log holds.
        """
        if not self.enabled or head.seq - self.saved_seq < self.every:
            return
        if self._writing is not None and not self._writing.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return
        started = loop.time()
        try:
            child = _fork_encode(state, head)
            self._child = child[0]
        except OSError as exc:
            self._failed(head.seq, self.saved_seq, f"cannot fork the encoder: {exc}")
            return
        log.info("snapshot_started", head_seq=head.seq, tasks=len(state.tasks),
                 pause_ms=round((loop.time() - started) * 1000, 1))
        previous, self.saved_seq = self.saved_seq, head.seq
        self._writing = asyncio.create_task(self._write(child, head, previous))

    def _failed(self, seq: int, previous: int, error: str) -> None:
        loop = asyncio.get_running_loop()
        self.saved_seq = previous  # due again at the next boundary past the backoff
        self._retry_at = loop.time() + self._backoff
        self._backoff = min(self._backoff * 2, 60.0)
        log.warning("snapshot_write_failed", head_seq=seq, error=error, retry_in_s=round(self._retry_at - loop.time(), 1))

    async def _write(self, child: tuple[int, int], head: ChainHead, previous: int) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            body = await asyncio.to_thread(_collect, *child)
            data = await asyncio.to_thread(seal_body, self.key, body, head)
            store = await self.js.object_store(subjects.SNAPSHOT_BUCKET)
            await store.put(name_of(head.seq), _Chunks(data))  # type: ignore[arg-type]
            await self._prune(store, head.seq)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self._failed(head.seq, previous, str(exc) or type(exc).__name__)
            return
        self._backoff = 1.0
        log.info("snapshot_saved", head_seq=head.seq, bytes=len(data), write_ms=round((loop.time() - started) * 1000, 1))

    async def _prune(self, store: ObjectStore, newest: int) -> None:
        """Delete all but the newest ``keep`` snapshots (entry and chunks, leaving no
        tombstone), and chunks no entry names (a write a crash cut short)."""
        infos = await _list(store)
        names = sorted((i.name for i in infos if i.name.startswith(PREFIX)), reverse=True)
        stream = subjects.obj_stream(subjects.SNAPSHOT_BUCKET)
        for name in names[self.keep:]:
            await store.delete(name)
            await self.js.purge_stream(stream, subject=subjects.obj_meta(subjects.SNAPSHOT_BUCKET, name))
            log.info("snapshot_deleted", name=name)
        kept = {i.nuid for i in infos if i.name in names[:self.keep]}
        chunks = f"$O.{subjects.SNAPSHOT_BUCKET}.C."
        info = await self.js.stream_info(stream, subjects_filter=f"{chunks}>")
        for subject in (info.state.subjects or {}):
            if subject[len(chunks):] not in kept:
                await self.js.purge_stream(stream, subject=subject)

    async def stop(self, timeout: float = 30.0) -> None:
        """Wait for a write in flight (a stopping router finishes the one it started); an
        encoder child still running after ``timeout`` is killed, and the write fails."""
        if self._writing is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._writing), timeout)
        except TimeoutError:
            if self._child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._child, signal.SIGKILL)
            await asyncio.gather(self._writing, return_exceptions=True)
        self._writing = None

    async def load(self, watch: anchor.Watch) -> tuple[RouterState, ChainHead] | None:
        """The state and chain head of the newest usable snapshot, ``watch`` given what it
        would have seen of the records up to it; ``None``: fold the whole log."""
        if not self.enabled:
            return None
        try:
            store = await self.js.object_store(subjects.SNAPSHOT_BUCKET)
            infos = await _list(store)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("snapshots_unreadable", error=str(exc) or type(exc).__name__)
            return None
        last = (await self.js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
        ingress_first = (await self.js.stream_info(subjects.INGRESS_STREAM)).state.first_seq
        for name in sorted((i.name for i in infos if i.name.startswith(PREFIX)), reverse=True):
            try:
                try:
                    # Into a buffer: without one, nats-py joins the chunks by repeated
                    # concatenation, which was half of a 48 MB snapshot's load (7 of 14 s).
                    buffer = io.BytesIO()
                    await store.get(name, writeinto=buffer)  # type: ignore[arg-type]
                    data = buffer.getvalue()
                except (nats.errors.Error, TimeoutError) as exc:
                    raise SnapshotRejected(f"it cannot be read: {exc or type(exc).__name__}") from exc
                try:
                    found = await self._check(data, last, ingress_first, watch)
                except (nats.errors.Error, TimeoutError) as exc:
                    raise SnapshotRejected(f"AUDIT could not be read to check it: {exc or type(exc).__name__}") from exc
            except SnapshotRejected as exc:
                log.warning("snapshot_rejected", name=name, reason=str(exc))
                continue
            self.saved_seq = found[1].seq
            return found
        return None

    async def _check(self, data: bytes, last: int, ingress_first: int,
                     watch: anchor.Watch) -> tuple[RouterState, ChainHead]:
        _, body = open_envelope(data, self.public)
        head = ChainHead(body.head_seq, body.head_hash)
        if head.seq > last:
            raise SnapshotRejected(f"it is at seq {head.seq}, AUDIT ends at seq {last}")
        at_head = await _stored_record(self.js, head.seq)
        if at_head.hash != head.hash:
            raise SnapshotRejected(f"AUDIT's record at seq {head.seq} has hash {at_head.hash}, "
                                   f"the snapshot says {head.hash}")
        # The anchor check must stay as strong as a full read: an anchored checkpoint at or
        # before the head must be the very record the snapshot's fold saw there.
        found: dict[int, AuditRecord] = {}
        for seq in sorted(s for s in watch.wanted if s <= head.seq):
            vouched = body.checkpoint_hashes.get(seq)
            if vouched is None:
                raise SnapshotRejected(f"the anchored seq {seq} is not a checkpoint the snapshot saw")
            record = await _stored_record(self.js, seq)
            if record.hash != vouched:
                raise SnapshotRejected(f"AUDIT's checkpoint at seq {seq} is not the one the snapshot saw")
            found[seq] = record
        audited: dict[int, AuditRecord] = {}
        for ingress, seq in body.audited:
            if ingress >= ingress_first:
                record = await _stored_record(self.js, seq)
                if record.ingress_seq != ingress:
                    raise SnapshotRejected(f"AUDIT's record at seq {seq} is not of INGRESS seq {ingress}")
                audited[seq] = record
        try:
            state = restore(body, audited, self.dedup_horizon_s, self.dedup_max_ids)
        except (ValueError, KeyError, StopIteration) as exc:
            raise SnapshotRejected(f"its body is inconsistent: {exc!r}") from exc
        watch.found.update(found)
        watch.restarts.extend(state.restarts)
        return state, head


async def _list(store: ObjectStore) -> list:  # type: ignore[type-arg]
    """The store's entries (none: an empty list, where nats-py raises)."""
    try:
        return await store.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        return []
