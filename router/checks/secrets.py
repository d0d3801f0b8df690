"""Secrets: private keys and cloud/API key shapes never reach the audit log in clear.

``scan`` runs right after decoding and *sanitises*: it replaces each secret with
``[REDACTED:<kind>]`` in the event every later check and the audit record see, and notes
what it found. It does not reject, so a message rejected for any other reason is still
recorded redacted. ``make`` builds the check that, later in the pipeline, rejects such a
message when policy says ``reject`` (the default is ``redact``: the message goes on with
the secret removed). The excerpt of an undecodable message is redacted with :func:`redact`.
"""

from __future__ import annotations

import re

from bus import codec
from bus.errors import SchemaError
from router.checks import Check, Inbound, Rejection
from router.policy import PolicyFile
from router.state import RouterState

# JSON text is scanned, so a PEM block's newlines are the two characters "\n".
PATTERNS: dict[str, re.Pattern[str]] = {
    "private-key": re.compile(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:[^\"]*?-----END [A-Z0-9 ]*PRIVATE KEY-----|[^\"]*)"
    ),
    "aws-access-key-id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "anthropic-api-key": re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
    "openai-api-key": re.compile(r"\bsk-(?!ant-)(?:proj-)?[A-Za-z0-9_-]{20,}"),
    "github-token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"),
    "slack-token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "google-api-key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),
    "stripe-secret-key": re.compile(r"\b[rs]k_live_[0-9A-Za-z]{16,}"),
}


# One pass over the text for every kind (scanned on every message): group names are the
# kinds with "-" as "_".
_ANY = re.compile("|".join(f"(?P<{name.replace('-', '_')}>{p.pattern})" for name, p in PATTERNS.items()))


# Every pattern above contains one of these literals. Substring search is C-fast, and
# the regex runs only on the rare message that has one (measured: the regex alone cost
# ~45us per message, more than any other check).
MARKERS = ("PRIVATE KEY", "AKIA", "ASIA", "sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "xox", "AIza", "k_live_")


def redact(text: str) -> tuple[str, list[str]]:
    """``text`` with every secret replaced, and the kinds of secret found (sorted)."""
    if not any(marker in text for marker in MARKERS):
        return text, []
    found: set[str] = set()

    def replace(m: re.Match[str]) -> str:
        name = (m.lastgroup or "secret").replace("_", "-")
        found.add(name)
        return f"[REDACTED:{name}]"

    return _ANY.sub(replace, text), sorted(found)


def scan(msg: Inbound, state: RouterState) -> Rejection | None:
    """Redact secrets from the decoded event; reject only if redaction breaks the event."""
    assert msg.event is not None
    text, found = redact(codec.encode(msg.event).decode())
    if not found:
        return None
    msg.secrets = found
    try:
        msg.event = codec.decode_event(text.encode())
    except SchemaError:
        # The secret sat in a field the schema constrains: keep only the redacted bytes.
        msg.event, msg.data = None, text.encode()
        return Rejection("secret_detected", f"the message carries {', '.join(found)} where it cannot be redacted")
    return None


def make(policy: PolicyFile) -> Check:
    """Reject a message that carried a secret, when policy says ``reject``."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        if msg.secrets and policy.current().secrets.action == "reject":
            return Rejection("secret_detected", f"the message carries {', '.join(msg.secrets)} (policy: reject)")
        return None

    return check
