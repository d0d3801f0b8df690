"""Claims bound to deliveries: the token a work item carries, and who may hold a skill.

A claim (``TaskStarted``) is accepted only from an agent that received the dispatch it
answers: every work item carries a claim token, and the claim must present it. The token
is ``HMAC-SHA256(secret, "<task id>/<dispatch>")``, where the secret is derived from the
router's signing key, so:

- only principals that may pull the item's WORK subject ever see it (NATS permissions: an
  agent may read only the consumers of the skills it was given; AUDIT and TRACES never
  hold it: a claim's record keeps its SHA-256, not the token);
- a fresh token per dispatch: a redelivery of the same dispatch carries the same one (that
  is what lets a replica take over from a claimant that died), a retry or re-dispatch a new
  one, and an old token answers nothing;
- the router needs no state to check it, and a restarted or standby router (which shares
  ``var/keys``) checks it the same way; nothing is written for it but the item itself.

The identity registry (``principals.json``, written by ``agentctl nats`` and ``agentctl
keys``) says which skills each agent identity was given; a claim for a skill its sender
was not given is refused even with a token, as a second, independent line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import TypeVar

import msgspec
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledgerbus.bus.events import TaskCompleted, TaskFailed, TaskStarted
from ledgerbus.bus.identity import REGISTRY_FILE

log = structlog.get_logger(__name__)

_CONTEXT = b"ledgerbus claim tokens v1"


class ClaimTokens:
    """Makes and checks the claim token of each dispatch. Until :meth:`use_key` is called
    every token is refused (a router that has not loaded its key accepts no claim)."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._secret = b""
        if key is not None:
            self.use_key(key)

    def use_key(self, key: Ed25519PrivateKey) -> None:
        """Derive the secret from the router's signing key (never the key itself)."""
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        self._secret = hmac.new(raw, _CONTEXT, hashlib.sha256).digest()

    def token(self, task_id: str, dispatch: int) -> str:
        """The token of ``task_id``'s dispatch number ``dispatch`` (43 URL-safe characters)."""
        if not self._secret:
            raise RuntimeError("claim tokens need the router's key: call use_key first")
        mac = hmac.new(self._secret, f"{task_id}/{dispatch}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def valid(self, task_id: str, dispatch: int, token: str) -> bool:
        """Whether ``token`` is the one the work item of this dispatch carried."""
        return bool(self._secret and token) and hmac.compare_digest(token, self.token(task_id, dispatch))


def fingerprint(token: str) -> str:
    """What a claim's audit record keeps of its token: enough to see that two claims
    presented the same one (a redelivery), nothing that could be presented again."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


E = TypeVar("E")


def token_of(event: object) -> str:
    """The claim token a message presents: a ``TaskStarted``'s, or a result's claim's."""
    if isinstance(event, TaskStarted):
        return event.token
    if isinstance(event, TaskCompleted | TaskFailed) and event.claim is not None:
        return event.claim.token
    return ""


def with_token(event: E, token: str) -> E:
    """``event`` with the claim token it presents replaced by ``token`` (see :func:`token_of`)."""
    if isinstance(event, TaskStarted):
        return msgspec.structs.replace(event, token=token)  # type: ignore[return-value]
    if isinstance(event, TaskCompleted | TaskFailed) and event.claim is not None:
        return msgspec.structs.replace(event, claim=msgspec.structs.replace(event.claim, token=token))  # type: ignore[return-value]
    return event


class AgentSkills:
    """The skills each agent identity was given, read from the registry and read again
    when the file changes, so ``agentctl keys add`` takes effect without a router restart.
    The file is looked at at most every ``interval_s``, and always before a claim would be
    refused for a skill not held (an agent registered a moment ago claims at once). An
    unreadable registry keeps the last one read."""

    def __init__(self, auth_dir: Path, interval_s: float = 1.0) -> None:
        self.path = auth_dir / REGISTRY_FILE
        self.interval_s = interval_s
        self._skills: dict[str, frozenset[str]] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = -float("inf")

    def of(self, principal: str, skill: str = "") -> frozenset[str] | None:
        """The skills of ``principal`` (``agent-echo-1``); ``None`` if it is not registered.
        When they lack ``skill``, the file is looked at again first."""
        now = time.monotonic()
        held = self._skills.get(principal)
        if now - self._checked >= self.interval_s or held is None or (skill and skill not in held):
            self._checked = now
            self._reload()
        return self._skills.get(principal)

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            rows = json.loads(self.path.read_text())["principals"]
            skills = {f"agent-{row['name']}": frozenset(row.get("skills", ())) for row in rows
                      if row.get("kind") == "agent"}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("registry_unreadable", path=str(self.path), error=str(exc))
            return
        self._skills, self._stamp = skills, stamp
