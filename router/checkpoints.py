"""Signed checkpoints: the router signs the chain head into the log every so many records
or seconds, and keeps the last one outside the log as well (the anchor), so that a log
deleted or replaced is refused rather than extended (docs/security.md)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from ledgerbus.bus import anchor, signing
from ledgerbus.bus.records import AuditRecord, Checkpoint
from ledgerbus.bus.settings import Settings
from ledgerbus.router.anchors import Anchors
from ledgerbus.router.audit import AuditLog, ChainHead
from ledgerbus.router.errors import AuditAppendError, ChainRestartedError
from ledgerbus.router.state import RouterState

log = structlog.get_logger(__name__)


class Checkpoints:
    """When to sign the chain head, how, and the anchors that follow each signature."""

    def __init__(self, js: JetStreamContext, settings: Settings, key: Ed25519PrivateKey, now: float) -> None:
        self.key = key
        self.every = settings.checkpoint_every
        self.interval_s = settings.checkpoint_interval_s
        self.anchors = Anchors(js, key, settings.router_key_path)
        self.last_at = now
        """When the last checkpoint was appended (the event loop's clock)."""
        self.stream_created: datetime | None = None
        """The AUDIT stream's creation time, as last read (the anchors name the stream by it)."""
        self._anchoring: asyncio.Task[None] | None = None
        """The newest anchor write under way (each waits for the one before)."""

    def due(self, head_seq: int, state: RouterState, now: float) -> bool:
        """Whether records are waiting to be signed, ``checkpoint_every`` of them or for
        ``checkpoint_interval_s``."""
        pending = head_seq - state.last_checkpoint_seq
        return pending > 0 and (pending >= self.every or now - self.last_at >= self.interval_s)

    async def append_if_due(self, audit: AuditLog, state: RouterState) -> bool:
        """Sign the chain head into the log when it is due; ``False`` if the log did not
        take the checkpoint (the caller rebuilds from the log)."""
        now = asyncio.get_running_loop().time()
        if not self.due(audit.head.seq, state, now):
            return True
        try:
            await self.append(audit, state)
        except AuditAppendError as exc:
            log.error("checkpoint_append_failed", error=str(exc))
            return False
        self.last_at = now
        return True

    async def append(self, audit: AuditLog, state: RouterState, code: str = "ok", reason: str = "") -> AuditRecord:
        """Sign the chain head, append it as the next record, and start anchoring it outside
        the log (:meth:`settled` waits for that). Raises :class:`AuditAppendError` if the log
        did not take it (nothing is anchored)."""
        head = audit.head
        stamp = datetime.now(UTC)
        checkpoint = signing.sign(
            self.key,
            Checkpoint(covers_seq=head.seq, chain_head=head.hash,
                       prev_checkpoint_seq=state.last_checkpoint_seq, key_id="", at=stamp),
        )
        record, data = audit.seal(AuditRecord(
            seq=0, at=stamp, verdict="accepted", code=code, reason=reason, principal="router",
            kind="checkpoint", key="router", msg_id="", ingress_seq=0, delivery=0, checkpoint=checkpoint,
        ))
        await audit.append([(record, data, {})])
        state.apply(record)
        log.info("checkpoint", seq=record.seq, covers_seq=head.seq)
        self._anchor(record.seq, checkpoint)
        return record

    def _anchor(self, seq: int, checkpoint: Checkpoint) -> None:
        """Anchor an acknowledged checkpoint without holding up the next batch: the file's
        two fsyncs and the bucket's put took 2.6 ms of the router's loop at each checkpoint.
        Anchors are written in order, each after the one before, so they only move forward;
        a router that dies first leaves the anchor at an older checkpoint the log still
        holds, as one dying between the append and the write always could."""
        before, created = self._anchoring, self.stream_created

        async def write() -> None:
            if before is not None:
                await asyncio.wait([before])
            try:
                await self.anchors.write(seq, checkpoint, created)
            except Exception:  # a bug: Anchors.write logs what it expects; the next checkpoint tries again
                log.exception("chain_anchor_write_failed", seq=seq)

        self._anchoring = asyncio.create_task(write(), name=f"anchor-{seq}")

    async def settled(self) -> None:
        """Wait for the anchor writes under way (at a stop, and before serving after a
        start-time checkpoint)."""
        if self._anchoring is not None:
            await asyncio.gather(self._anchoring, return_exceptions=True)

    async def check_anchors(self, head: ChainHead, watch: anchor.Watch, audit: AuditLog, state: RouterState,
                            accept_new_chain: bool) -> None:
        """Refuse a stream that no longer holds a checkpoint this key anchored outside it;
        with ``accept_new_chain``, append the break instead, as a signed checkpoint record
        naming every anchor it supersedes (the anchors then move to it)."""
        broken = self.anchors.broken(head, watch, self.stream_created, accept_new_chain)
        if not broken:
            return
        if not accept_new_chain:
            raise ChainRestartedError(
                f"refusing to start a new audit chain: {broken[0][2].detail}. If the log was reset on purpose, "
                "start the router once with --accept-new-chain (the break is recorded in the new chain), "
                "see docs/security.md"
            )
        record = await self.append(audit, state, code=anchor.RESTART_CODE,
                                   reason=anchor.restart_reason((source, a) for source, a, _ in broken))
        await self.settled()
        log.warning("chain_restart_accepted", seq=record.seq, superseded=[a.token for _, a, _ in broken])

    async def anchor_head(self, state: RouterState) -> None:
        """Write the log's newest checkpoint to the anchors, once per start: the anchor
        follows a restored stream, and a file that cannot be written stops the router here
        rather than at its next checkpoint."""
        if state.last_checkpoint is not None:
            await self.anchors.write(state.last_checkpoint_seq, state.last_checkpoint, self.stream_created,
                                     strict=True)
