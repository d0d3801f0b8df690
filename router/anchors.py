"""The router's side of the chain's anchor (``bus/anchor.py``): read this key's anchors at
start, say which the stream no longer holds, and move them on with every checkpoint."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ledgerbus.bus import anchor, signing
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.records import Checkpoint

log = structlog.get_logger(__name__)

Broken = list[tuple[str, anchor.Anchor, anchor.Comparison]]
"""Anchors the stream no longer holds: (where it was read, the anchor, what was found)."""


class Anchors:
    """This router key's anchors, by where they are kept: ``file <path>`` beside the key,
    and the ``chain`` bucket."""

    def __init__(self, js: JetStreamContext, key: Ed25519PrivateKey, key_path: Path) -> None:
        self.js = js
        self.public = signing.public_hex(key)
        self.path = anchor.file_path(key_path)
        self.file_source = f"file {self.path}"
        self.held: dict[str, anchor.Anchor] = {}
        """Where each anchor was read, or last written by this process → that anchor."""
        self._bucket: KeyValue | None = None
        """The ``chain`` bucket, once looked up (each lookup is a round trip)."""

    async def load(self) -> None:
        """Read the anchors this key signed.

        An anchor this key did not sign (another key's, or a forgery) says nothing about
        this router's chain: it is logged and set aside. The file is on the router's own
        disk, so one that does not decode stops the router (:class:`bus.anchor.AnchorError`)
        for an operator to look at; an unreadable bucket does not, the file stands in for it.
        """
        found: dict[str, anchor.Anchor] = {}
        if (in_file := anchor.read_file(self.path)) is not None:
            found[self.file_source] = in_file
        try:
            if (in_bucket := await anchor.read_bucket(self.js)) is not None:
                found[anchor.BUCKET_SOURCE] = in_bucket
        except anchor.AnchorError as exc:
            log.warning("chain_anchor_unreadable", source=anchor.BUCKET_SOURCE, error=str(exc))
        self.held = {}
        for source, found_anchor in found.items():
            if signing.valid(self.public, found_anchor.checkpoint):
                self.held[source] = found_anchor
            else:
                log.warning("chain_anchor_not_ours", source=source, key_id=found_anchor.checkpoint.key_id,
                            own_key_id=signing.key_id(self.public))

    def watch(self) -> anchor.Watch:
        """What to look at while the log is read, to compare it with the anchors after."""
        return anchor.Watch.of(self.held.values())

    def broken(self, head: ChainHead, watch: anchor.Watch, created: datetime | None, accepting: bool) -> Broken:
        """The anchors a stream read through ``watch`` up to ``head`` no longer holds; each
        is logged, with what the stream holds instead."""
        broken: Broken = []
        for source, anchored in self.held.items():
            found = anchor.compare(anchored, head, watch, created, source)
            if found.ok:
                continue
            broken.append((source, anchored, found))
            log.error("chain_restart_found", source=source, anchor_seq=anchored.seq,
                      covers_seq=anchored.checkpoint.covers_seq, chain_head=anchored.checkpoint.chain_head,
                      key_id=anchored.checkpoint.key_id, head_seq=head.seq, head_hash=head.hash,
                      stream_created=created.isoformat() if created else None, detail=found.detail,
                      accepted=accepting)
        return broken

    async def write(self, seq: int, checkpoint: Checkpoint, created: datetime | None, strict: bool = False) -> None:
        """Anchor the checkpoint at ``seq`` outside the log: the file beside the key, then the
        bucket. Called only once its record is acknowledged, so an anchor never names a
        checkpoint the log does not hold.

        ``strict`` (at start) lets a file that cannot be written stop the router; while
        serving that is logged, and the anchors written before still hold.
        """
        new = anchor.Anchor(seq=seq, checkpoint=checkpoint, stream_created=created, written_at=datetime.now(UTC))
        try:
            # Two fsyncs: in a thread, so the router's loop runs on meanwhile.
            await asyncio.to_thread(anchor.write_file, self.path, new)
            self.held[self.file_source] = new
        except anchor.AnchorError as exc:
            if strict:
                raise
            log.error("chain_anchor_write_failed", source=self.file_source, error=str(exc))
        try:
            self._bucket = await anchor.write_bucket(self.js, new, self._bucket)
            self.held[anchor.BUCKET_SOURCE] = new
        except anchor.AnchorError as exc:
            log.warning("chain_anchor_write_failed", source=anchor.BUCKET_SOURCE, error=str(exc))
