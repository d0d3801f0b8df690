"""Encoders and decoders, built once at import of this module and shared.

JSON on the wire everywhere: it is what a person sees in ``agentctl events --json`` and
what the hash chain covers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ledgerbus.bus.errors import SchemaError, UnreadableRecord
from ledgerbus.bus.events import AnyEvent
from ledgerbus.bus.messages import WorkItem
from ledgerbus.bus.problems import explain
from ledgerbus.bus.records import AuditRecord

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_record_decoder = msgspec.json.Decoder(AuditRecord)
_work_decoder = msgspec.json.Decoder(WorkItem)


def encode(value: Any) -> bytes:
    """Encode any Struct or JSON-able value as compact JSON."""
    return _encoder.encode(value)


def _decode(decoder: msgspec.json.Decoder[T], data: bytes, what: str) -> T:
    # msgspec raises RecursionError, not DecodeError, for deeply nested input, and some
    # releases UnicodeDecodeError for invalid UTF-8 inside a string: unmapped, one such
    # message would crash the decoding process.
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        problem = explain(exc)
        raise SchemaError(f"{what}{problem}", problem) from exc


def decode_event(data: bytes) -> AnyEvent:
    """Strictly decode an ingress message; :class:`SchemaError` names what was wrong."""
    return _decode(_event_decoder, data, "")


def decode_record(data: bytes) -> AuditRecord:
    """Decode one audit record (one read from the log: :func:`read_record`)."""
    return _decode(_record_decoder, data, "audit record: ")


DAMAGED = frozenset({"json", "utf8", "too_deep"})
"""The kinds of :class:`bus.problems.Problem` that mean bytes are not a record at all.

Any other problem in a stored record (an unknown field, an event kind or ``Literal``
value this version does not know, a type it does not expect) means another version of
the schema wrote it: the router stores nothing its own decoder does not read back
(:func:`bus.chain.seal`), and schemas only grow, so it is a newer one."""


def read_record(seq: int, data: bytes) -> AuditRecord:
    """Decode the record stored at AUDIT ``seq``, for a reader of the log.

    Every reader goes through here, and none skips what it cannot read: a record folded by
    one process and skipped by another would make their states differ in silence (a live
    projection and its rebuild, a router and its standby). :class:`UnreadableRecord`
    names the sequence, the JSON path and the likely cause; a record of a newer schema
    means this process must be upgraded before it reads on (docs/architecture.md,
    "Schema evolution").
    """
    try:
        return _record_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        problem = explain(exc)
        newer = problem.kind not in DAMAGED
        cause = (
            "probably written by a newer ledgerbus: upgrade this process (readers before writers, "
            "see docs/architecture.md, Schema evolution)"
            if newer else "the stored bytes are damaged or not a router's: run `agentctl audit verify`"
        )
        where = f"{problem.message} - at `{problem.path or '$'}`"  # the whole record too has a path
        raise UnreadableRecord(f"AUDIT seq {seq} cannot be read: {where}; {cause}", problem, seq, newer) from exc


def decode_work(data: bytes) -> WorkItem:
    """Decode one dispatched work item."""
    return _decode(_work_decoder, data, "work item: ")


def to_builtins(value: Any) -> Any:
    """Convert Structs (recursively) to dicts and lists, e.g. for ``--json`` output."""
    return msgspec.to_builtins(value)
