"""Encoders and decoders, built once at import of this module and shared.

JSON on the wire everywhere: it is what a person sees in ``agentctl events --json`` and
what the hash chain covers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from bus.errors import SchemaError
from bus.events import AnyEvent, AuditRecord, WorkItem
from bus.problems import explain

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
    """Decode one audit record."""
    return _decode(_record_decoder, data, "audit record: ")


def decode_work(data: bytes) -> WorkItem:
    """Decode one dispatched work item."""
    return _decode(_work_decoder, data, "work item: ")


def to_builtins(value: Any) -> Any:
    """Convert Structs (recursively) to dicts and lists, e.g. for ``--json`` output."""
    return msgspec.to_builtins(value)
