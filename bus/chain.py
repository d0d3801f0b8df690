"""The audit hash chain: ``hash_n = sha256(hash_{n-1} || canonical bytes of record n)``.

The canonical bytes of a record are its JSON encoding with ``hash`` set to the empty
string. The first record chains from :data:`GENESIS`. A record is stored exactly as
:func:`seal` encodes it, so a verifier also demands that re-encoding a stored record
gives back the stored bytes: any byte changed on disk shows up, even one that decodes
to the same values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from ledgerbus.bus import codec
from ledgerbus.bus.errors import ChainError
from ledgerbus.bus.records import AuditRecord

GENESIS = "0" * 64


def record_hash(prev_hash: str, record: AuditRecord) -> str:
    """The hash a record must carry, given the hash of the record before it."""
    canonical = codec.encode(msgspec.structs.replace(record, prev_hash=prev_hash, hash=""))
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical).hexdigest()


def seal(record: AuditRecord, prev_hash: str) -> tuple[AuditRecord, bytes]:
    """Link ``record`` to ``prev_hash``; return the sealed record and its stored bytes.

    The record is first passed through one encode/decode, so values built in Python
    (an ``int`` in a ``float`` field, say) take the form a verifier will decode them
    to: the stored bytes are then exactly what re-encoding the stored record gives.
    """
    record = codec.decode_record(codec.encode(record))
    sealed = msgspec.structs.replace(record, prev_hash=prev_hash, hash=record_hash(prev_hash, record))
    return sealed, codec.encode(sealed)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record of the chain: its stream sequence and hash."""

    seq: int = 0
    hash: str = GENESIS


def verify(stored: Iterable[tuple[int, bytes]], start: ChainHead = ChainHead()) -> ChainHead:
    """Recompute the chain over ``(stream seq, stored bytes)`` pairs, in order.

    Returns the head after the last record, or raises :class:`ChainError` naming the
    first sequence that is out of place, altered, or does not link to the one before
    (:class:`~bus.errors.UnreadableRecord` for one this version cannot decode).
    """
    head = start
    for seq, data in stored:
        _, head = verify_next(seq, data, head)
    return head


def verify_next(seq: int, data: bytes, head: ChainHead) -> tuple[AuditRecord, ChainHead]:
    """Check the record stored at ``seq`` follows ``head``; return it (decoded once, for
    callers that also fold it) and the new head. Raises :class:`ChainError`, or
    :class:`~bus.errors.UnreadableRecord` for a record this version cannot decode: its
    chain may be intact, but nothing past it can be checked (or folded) here."""
    if seq != head.seq + 1:
        raise ChainError(
            f"seq {head.seq + 1}: missing (deleted, or unreadable on disk); the next record is seq {seq}",
            head.seq + 1,
        )
    record = codec.read_record(seq, data)
    if record.seq != seq:
        raise ChainError(f"seq {seq}: record says it is seq {record.seq}", seq)
    if record.prev_hash != head.hash:
        raise ChainError(f"seq {seq}: prev_hash does not match the hash of seq {head.seq}", seq)
    if record.hash != record_hash(head.hash, record):
        raise ChainError(f"seq {seq}: hash does not recompute (the record was altered)", seq)
    if codec.encode(record) != data:
        raise ChainError(f"seq {seq}: stored bytes are not canonical (the record was altered)", seq)
    return record, ChainHead(seq, record.hash)
