"""Recorded LLM calls: what a skill asked, what the model answered, stored by content hash.

Every call ``ctx.llm.chat(...)`` answers is written to the LLMCALLS stream as one
:class:`CallRecord`, on subject ``llmcalls.<sha256 of the record's bytes>``, before the
``task_usage`` record that reports it is sent; that record carries the hash
(``TaskUsage.call``), so the chained audit log vouches for the recording: a body that does
not hash to its name is refused by every reader (:func:`fetch`).

A record keeps:

- the skill's request (system prompt, messages, schema, its own ``max_tokens`` and
  ``temperature``) and :func:`request_hash`, the sha256 of that request as the skill made
  it: what strict replay matches on, whatever route answers;
- the route's choice (provider, model, ``max_tokens``, params) and the answer (text,
  structured data, stop reason, tokens);
- where it happened: task, attempt, the task's path in its tree and the call's number
  ``n`` within the attempt (what lenient replay matches on), skill, role and agent.

Secrets are redacted by the scanner the router runs on every ingress message
(:mod:`bus.redaction`), in the request and in the answer; the kinds found are listed in
``redacted``. A record larger than ``LEDGERBUS_LLM_RECORD_MAX_BYTES`` drops its request's
text (the hash stays, so strict replay still matches), then its answer (which can then not
be replayed), says which in ``truncated`` and logs ``llm_call_truncated``.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext

from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message
from ledgerbus.bus import redaction, subjects
from ledgerbus.bus.errors import BusError, NotFound

log = structlog.get_logger(__name__)

FORMAT = 1
_T = TypeVar("_T")
_HASH_HEX = 64


class RecordedAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What the model answered."""

    text: str
    data: Any = None
    stop_reason: str = ""
    tokens_in: int = 0
    tokens_out: int = 0


class CallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One answered LLM call, as stored (see the module docstring)."""

    v: int = FORMAT
    task_id: str
    attempt: int = 1
    path: str = ""
    """The task's place in its tree (``WorkItem.path``): the same in a re-run or a fork."""
    n: int = 1
    """The call's number within the task's attempt, from 1."""
    skill: str = ""
    role: str = ""
    agent: str = ""
    request: ChatRequest
    request_hash: str
    provider: str
    model: str
    max_tokens: int = 0
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    answer: RecordedAnswer | None
    """``None`` only when the record was too large to keep it (``truncated`` says)."""
    at: datetime
    latency_s: float = 0.0
    redacted: list[str] = msgspec.field(default_factory=list)
    """The kinds of secret replaced by ``[REDACTED:<kind>]`` in the request or the answer."""
    truncated: Literal["", "request", "answer"] = ""

    def result(self) -> ChatResult:
        """The answer as the router returns it (for replay)."""
        if self.answer is None:
            raise ValueError("this recording kept no answer (it was larger than the record cap)")
        a = self.answer
        return ChatResult(text=a.text, data=a.data, provider=self.provider, model=self.model, tokens_in=a.tokens_in,
                          tokens_out=a.tokens_out, stop_reason=a.stop_reason)


def request_hash(request: ChatRequest) -> str:
    """The sha256 of the skill's request, canonically encoded: what strict replay matches."""
    return hashlib.sha256(msgspec.json.encode(request, order="sorted")).hexdigest()


def call_hash(body: bytes) -> str:
    """A recorded call's name: the sha256 of its stored bytes."""
    return hashlib.sha256(body).hexdigest()


def is_call_hash(value: str) -> bool:
    """Whether ``value`` can name a recorded call (64 lowercase hex digits)."""
    return len(value) == _HASH_HEX and all(c in "0123456789abcdef" for c in value)


def make(*, task_id: str, attempt: int, path: str, n: int, skill: str, role: str, agent: str,
         request: ChatRequest, request_sha256: str, result: ChatResult, max_tokens: int,
         params: dict[str, Any], max_bytes: int) -> tuple[CallRecord, bytes]:
    """The record of one answered call, redacted and held to ``max_bytes``, and its bytes."""
    kinds: list[str] = []
    clean_request = _redacted(request, ChatRequest, kinds)
    answer = _redacted(RecordedAnswer(text=result.text, data=result.data, stop_reason=result.stop_reason,
                                      tokens_in=result.tokens_in, tokens_out=result.tokens_out), RecordedAnswer, kinds)
    record = CallRecord(task_id=task_id, attempt=attempt, path=path, n=n, skill=skill, role=role, agent=agent,
                        request=clean_request, request_hash=request_sha256, provider=result.provider,
                        model=result.model, max_tokens=max_tokens, params=params, answer=answer,
                        at=datetime.now(UTC), latency_s=result.latency_s, redacted=sorted(set(kinds)))
    body = encode(record)
    if len(body) > max_bytes:
        size = len(body)
        dropped = msgspec.structs.replace(clean_request, system="", messages=[
            Message(role=m.role, content=f"[TRUNCATED: {len(m.content)} characters]") for m in clean_request.messages])
        record = msgspec.structs.replace(record, request=dropped, truncated="request")
        body = encode(record)
        if len(body) > max_bytes:
            record = msgspec.structs.replace(record, answer=None, truncated="answer")
            body = encode(record)
        log.warning("llm_call_truncated", task_id=task_id, n=n, size=size, max_bytes=max_bytes,
                    dropped=record.truncated,
                    effect="strict replay still matches by request hash" if record.truncated == "request"
                    else "this call cannot be replayed: its answer was not kept")
    return record, body


def _redacted(value: _T, kind: type[_T], found: list[str]) -> _T:
    raw = msgspec.json.encode(value)
    clean, kinds = redaction.redact_bytes(raw)
    if not kinds:
        return value
    found.extend(kinds)
    try:
        return msgspec.json.decode(clean, type=kind)
    except msgspec.DecodeError:  # a finding that straddled JSON syntax: keep the structure, lose the text
        return msgspec.json.decode(redaction.scrub(raw.decode()).encode(), type=kind)


def encode(record: CallRecord) -> bytes:
    """A record's stored bytes (sorted keys: the same record, the same hash)."""
    return msgspec.json.encode(record, order="sorted")


def decode(body: bytes) -> CallRecord:
    """A stored record; :class:`msgspec.ValidationError` or ``DecodeError`` if it is not one."""
    return msgspec.json.decode(body, type=CallRecord)


class CallNotFound(NotFound):
    """No recorded call by that hash (never stored, or past the stream's age limit)."""


class CallCorrupt(BusError):
    """A stored body that does not hash to its name, or is not a call record."""


async def store(js: JetStreamContext, body: bytes) -> str:
    """Store a record's bytes under their hash; the hash. Storing the same bytes again is
    harmless (the first copy stays)."""
    name = call_hash(body)
    try:
        await js.publish(subjects.llm_call(name), body, stream=subjects.LLMCALLS_STREAM,
                         headers={subjects.HDR_MSG_ID: name})
    except nats.js.errors.APIError as exc:
        # Discard-new per subject: this exact record is there already.
        if "maximum messages per subject" not in str(exc.description or exc):
            raise
    return name


async def fetch_bytes(js: JetStreamContext, call: str) -> bytes:
    """The stored bytes of ``call``, checked against its hash."""
    if not is_call_hash(call):
        raise CallNotFound(f"{call!r} is not a call hash (64 hex digits, from `agentctl usage --calls`)")
    try:
        msg = await js.get_msg(subjects.LLMCALLS_STREAM, subject=subjects.llm_call(call), direct=True)
    except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError) as exc:
        raise CallNotFound(f"no recorded call {call} (never stored, or older than the recordings' age limit)") from exc
    body = msg.data or b""
    if call_hash(body) != call:
        raise CallCorrupt(f"recorded call {call} does not match its hash (sha256 of what is stored: "
                          f"{call_hash(body)}): it was changed after it was recorded")
    return body


async def fetch(js: JetStreamContext, call: str) -> CallRecord:
    """The recorded call ``call``, checked against its hash."""
    body = await fetch_bytes(js, call)
    try:
        return decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise CallCorrupt(f"recorded call {call} is not a call record: {exc}") from exc
