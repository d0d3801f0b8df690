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

from bus import codec
from bus.errors import SchemaError
from bus.redaction import redact, redact_bytes
from router.checks import Check, Inbound, Rejection
from router.policy import PolicyFile
from router.state import RouterState

__all__ = ["make", "redact", "scan"]


def scan(msg: Inbound, state: RouterState) -> Rejection | None:
    """Redact secrets from the decoded event; reject only if redaction breaks the event."""
    assert msg.event is not None
    data, found = redact_bytes(codec.encode(msg.event))
    if not found:
        return None
    msg.secrets = found
    try:
        msg.event = codec.decode_event(data)
    except SchemaError:
        # The secret sat in a field the schema constrains: keep only the redacted bytes.
        msg.event, msg.data = None, data
        return Rejection("secret_detected", f"the message carries {', '.join(found)} where it cannot be redacted")
    return None


def make(policy: PolicyFile) -> Check:
    """Reject a message that carried a secret, when policy says ``reject``."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        if msg.secrets and policy.current().secrets.action == "reject":
            return Rejection("secret_detected", f"the message carries {', '.join(msg.secrets)} (policy: reject)")
        return None

    return check
