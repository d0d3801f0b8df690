"""The audit log's own structs: :class:`AuditRecord`, one per ingress message and
hash-chained (:mod:`bus.chain`), and what a record may hold besides its event.

They forbid unknown fields, as the events do, so a reader meeting a record of a newer
schema stops and names it (:func:`bus.codec.read_record`) instead of folding part of it:
see "Schema evolution" in docs/architecture.md. Schemas only grow: a new field always has
a default.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from ledgerbus.bus.events import AnyEvent

Verdict = Literal["accepted", "rejected"]


class RawExcerpt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the audit log keeps of a message that could not be decoded."""

    size: int
    sha256: str
    head: str
    """The first bytes, decoded as UTF-8 with replacement, so a person can see what came."""


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The router's signed statement: the chain up to ``covers_seq`` has head ``chain_head``.

    Written into the log itself every so many records, as CloudTrail digests and RFC 6962
    signed tree heads are; ``signature`` is Ed25519 over this struct's JSON with
    ``signature=""``, by the key whose sha256 prefix is ``key_id``.
    """

    covers_seq: int
    chain_head: str
    prev_checkpoint_seq: int
    key_id: str
    at: datetime | None = None
    signature: str = ""


class ArchiveSeal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The router's signed statement about one archive segment: records ``first_seq`` to
    ``last_seq`` chain from ``prev_hash`` to ``last_hash``, and the file holding them has
    ``sha256``. ``signature`` is Ed25519 over this struct's JSON with ``signature=""``, by the
    key whose sha256 prefix is ``key_id`` (as a :class:`Checkpoint`'s)."""

    file: str
    first_seq: int
    last_seq: int
    first_at: datetime
    last_at: datetime
    prev_hash: str
    last_hash: str
    sha256: str
    bytes: int
    key_id: str = ""
    signature: str = ""


RetentionAction = Literal["archived", "expired"]


class Retention(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the retention rule did, recorded before it is done (``docs/architecture.md``,
    Retention and archives).

    ``archived``: records ``1..through_seq`` are in the archive's segments (``segments``,
    the new ones) and leave the live stream; the projections and the router's state let go
    of the tasks settled by then. ``expired``: the ``segments`` named are older than the
    archive's own retention and are deleted.
    """

    action: RetentionAction
    rule: str
    """The rule that made the cut, as a person reads it, e.g. ``audit_max_age 7d``."""
    through_seq: int
    segments: list[ArchiveSeal] = []


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """One entry of the audit log: the router's verdict on one ingress message.

    ``hash = sha256(prev_hash || canonical bytes of this record with hash="")``; see
    :mod:`bus.chain`. ``seq`` is the AUDIT stream sequence the record was appended at.
    """

    seq: int
    at: datetime
    verdict: Verdict
    code: str
    reason: str
    principal: str
    kind: str
    key: str
    msg_id: str
    ingress_seq: int
    delivery: int
    trace_id: str = ""
    event: AnyEvent | None = None
    raw: RawExcerpt | None = None
    checkpoint: Checkpoint | None = None
    retention: Retention | None = None
    """Set on the router's ``audit_archived`` and ``archive_expired`` records only."""
    prev_hash: str = ""
    hash: str = ""

    @property
    def accepted(self) -> bool:
        """Whether the router accepted the message."""
        return self.verdict == "accepted"
