"""Secrets: private keys, API keys and passwords never reach the audit log in clear.

What counts as a secret is :mod:`bus.redaction` (key shapes, the secret half of an AWS
key pair, and random values under key-like names). ``scan`` runs right after decoding
and *sanitises*: it replaces each secret with ``[REDACTED:<kind>]`` in the event every
later check and the audit record see, and notes what it found. It does not reject, so a
message rejected for any other reason is still recorded redacted. ``make`` builds the
check that, later in the pipeline, rejects such a message when policy says ``reject``
(the default is ``redact``: the message goes on with the secret removed). The excerpt of
an undecodable message, a client's ``Nats-Msg-Id`` and rejection reasons are redacted
with :func:`redact`.
"""

from __future__ import annotations

from ledgerbus.bus import codec
from ledgerbus.bus.errors import SchemaError
from ledgerbus.bus.redaction import redact, redact_bytes
from ledgerbus.router.checks import Check, Inbound, Learned, Rejection, learned
from ledgerbus.router.claims import token_of, with_token
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState

__all__ = ["make", "redact", "scan"]


def scan(msg: Inbound, state: RouterState) -> Rejection | Learned | None:
    """Redact secrets from the decoded event; reject only if redaction breaks the event.

    A claim's token (a ``TaskStarted``'s, or a result's claim's) is left out of the scan: it is a random value under a key-like name,
    so it looks like a secret, and it is one, but one the protocol needs (the lifecycle
    check compares it) and that no record keeps (its record holds a fingerprint).
    """
    event = msg.event
    assert event is not None
    token = token_of(event)
    if token:
        event = with_token(event, "")
    data, found = redact_bytes(codec.encode(event))
    if not found:
        return None
    try:
        redacted = codec.decode_event(data)
        if token:
            redacted = with_token(redacted, token)
        return learned(event=redacted, secrets=tuple(found))
    except SchemaError:
        # The secret sat in a field the schema constrains: keep only the redacted bytes.
        return Rejection("secret_detected", f"the message carries {', '.join(found)} where it cannot be redacted",
                         learned={"event": None, "data": data, "secrets": tuple(found)})


def make(policy: PolicyFile) -> Check:
    """Reject a message that carried a secret, when policy says ``reject``."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        if msg.secrets and policy.current().secrets.action == "reject":
            return Rejection("secret_detected", f"the message carries {', '.join(msg.secrets)} (policy: reject)")
        return None

    return check
