"""What the router writes about one message: its audit record, and the same facts as
span attributes; the :class:`Decision` that carries a message from audit to settlement."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ledgerbus.bus import subjects
from ledgerbus.bus.events import (
    AGENT_EVENTS,
    MEMORY_EVENTS,
    TASK_EVENTS,
    ProposalApproved,
    RunForked,
    SharedWritten,
    kind_of,
)
from ledgerbus.bus.records import AuditRecord, RawExcerpt
from ledgerbus.router.checks import Inbound, secrets
from ledgerbus.router.claims import fingerprint, token_of, with_token

_RAW_HEAD_BYTES = 256
_TOKEN_FIELD = re.compile(r'("token"\s*:\s*)"[^"]*"?')


@dataclass(slots=True)
class Decision:
    """One INGRESS message, its audit record, the headers its actions carry, and the
    span that processes it (ended once the message is settled)."""

    msg: Msg
    record: AuditRecord
    headers: dict[str, str]
    span: trace.Span = trace.INVALID_SPAN

    def end(self, error: str = "") -> None:
        """End the processing span (with an error status if ``error``)."""
        if error:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


def trace_headers(traceparent: str) -> dict[str, str]:
    return {subjects.HDR_TRACEPARENT: traceparent} if traceparent else {}


def record_attributes(record: AuditRecord) -> dict[str, Any]:
    """Span attributes naming what an audit record says about which task."""
    attrs: dict[str, Any] = {"ledgerbus.verdict": record.verdict, "ledgerbus.code": record.code,
                             "ledgerbus.kind": record.kind, "ledgerbus.principal": record.principal,
                             "ledgerbus.audit.seq": record.seq}
    event = record.event
    if event is not None and isinstance(event, TASK_EVENTS):
        attrs["ledgerbus.task_id"] = event.task_id
    if (skill := getattr(event, "skill", None)) is not None:
        attrs["ledgerbus.skill"] = skill
    return attrs


def record_for(inbound: Inbound, code: str, reason: str, trace_id: str, accepted: bool) -> AuditRecord:
    """Build the (unsealed) audit record of one checked message. ``accepted`` is whether no
    check rejected it: the code alone cannot say (``no_agent`` is a warning on an accepted
    submission, or a rejection, as policy says)."""
    event = inbound.event
    kind = kind_of(type(event)) if event is not None else "unknown"
    if event is not None and isinstance(event, TASK_EVENTS):
        key = event.task_id
    elif event is not None and isinstance(event, AGENT_EVENTS) and inbound.principal is not None:
        key = inbound.principal.name or inbound.principal.token
    elif event is not None and isinstance(event, MEMORY_EVENTS):
        key = event.agent
    elif isinstance(event, SharedWritten):
        key = event.namespace
    elif isinstance(event, ProposalApproved):
        key = event.proposal_id
    elif isinstance(event, RunForked):
        key = event.task_id
    else:
        key = "_"
    if event is not None and (token := token_of(event)):
        # The token proves a delivery; the log keeps its fingerprint, never the token,
        # so nobody who reads AUDIT (operators, the projector) could present it.
        event = with_token(event, fingerprint(token))
    raw = None
    if event is None:
        # Redact the whole text before cutting the excerpt, so a secret cut in half by
        # the cut is still recognised.
        text, _ = secrets.redact(inbound.data.decode("utf-8", errors="replace"))
        text = _TOKEN_FIELD.sub(r'\1"[claim token]"', text)
        raw = RawExcerpt(
            size=len(inbound.data),
            sha256=hashlib.sha256(inbound.data).hexdigest(),
            head=text[:_RAW_HEAD_BYTES],
        )
    if accepted and inbound.secrets:
        reason = "; ".join(filter(None, [reason, f"redacted: {', '.join(inbound.secrets)}"]))
    # A reason can quote the client: an unknown field's name, the subject's kind token.
    reason = secrets.redact(reason)[0]
    return AuditRecord(
        seq=0,
        at=datetime.now(UTC),
        verdict="accepted" if accepted else "rejected",
        code=code,
        reason=reason,
        principal=inbound.principal.token if inbound.principal is not None else "unknown",
        kind=kind,
        key=key,
        msg_id=event.id if event is not None else secrets.redact(inbound.headers.get(subjects.HDR_MSG_ID, ""))[0][:64],
        ingress_seq=inbound.ingress_seq,
        delivery=inbound.delivery,
        trace_id=trace_id,
        event=event,
        raw=raw,
    )
