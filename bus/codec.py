"""Encoders and decoders, built once at import of this module and shared.

JSON on the wire everywhere: it is what a person sees in ``agentctl events --json`` and
what the hash chain covers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from bus.errors import SchemaError
from bus.events import AnyEvent, AuditRecord, WorkItem

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_record_decoder = msgspec.json.Decoder(AuditRecord)
_work_decoder = msgspec.json.Decoder(WorkItem)


def encode(value: Any) -> bytes:
    """Encode any Struct or JSON-able value as compact JSON."""
    return _encoder.encode(value)


def decode_event(data: bytes) -> AnyEvent:
    """Strictly decode an ingress message; :class:`SchemaError` names what was wrong."""
    try:
        return _event_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SchemaError(str(exc)) from exc


def decode_record(data: bytes) -> AuditRecord:
    """Decode one audit record."""
    try:
        return _record_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SchemaError(f"audit record: {exc}") from exc


def decode_work(data: bytes) -> WorkItem:
    """Decode one dispatched work item."""
    try:
        return _work_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SchemaError(f"work item: {exc}") from exc


def to_builtins(value: Any) -> Any:
    """Convert Structs (recursively) to dicts and lists, e.g. for ``--json`` output."""
    return msgspec.to_builtins(value)
