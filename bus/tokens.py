"""Bearer tokens for the HTTP gateway: each one acts as one CLI principal, never more.

A token is ``lbt_<id>_<secret>``. The file ``<auth dir>/tokens.json`` keeps, per token, the
principal it is bound to, the SHA-256 of its secret, and that principal's NATS credentials
sealed with a key derived from the secret (HKDF-SHA256, AES-256-GCM). So the gateway can
act as alice only while someone presents alice's token: at rest it holds no credentials it
could use, and whatever it sends is checked and audited by the router as ``cli-alice``, as
if alice had run ``agentctl`` herself. Revoking deletes the entry (and with it the sealed
credentials); the gateway re-reads the file when it changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.identity import CREDS_DIR, Credentials

TOKENS_FILE = "tokens.json"
PREFIX = "lbt_"


class Token(msgspec.Struct, frozen=True):
    """One issued token, as stored (the secret itself is never stored)."""

    id: str
    principal: str
    digest: str
    """Hex SHA-256 of the secret."""
    salt: str
    nonce: str
    sealed: str
    """The principal's credentials, AES-GCM sealed under HKDF(secret, salt); base64."""
    created_at: str
    note: str = ""


class TokenError(ConfigError):
    """A token file or a credentials file that cannot be used."""


def _path(auth_dir: Path) -> Path:
    return auth_dir / TOKENS_FILE


def load(auth_dir: Path) -> dict[str, Token]:
    """Every issued token by id (none when there is no file)."""
    path = _path(auth_dir)
    try:
        return {t.id: t for t in msgspec.json.decode(path.read_bytes(), type=list[Token])}
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as exc:
        raise TokenError(f"{path}: {exc}") from exc


def _save(auth_dir: Path, tokens: dict[str, Token]) -> None:
    path = _path(auth_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(sorted(tokens.values(), key=lambda t: t.created_at))))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _key(secret: str, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"ledgerbus token").derive(secret.encode())


def issue(auth_dir: Path, principal: str, note: str = "") -> str:
    """Issue a token for ``principal`` (a ``cli-<name>`` whose credentials file exists);
    returns the token, shown once."""
    if not principal.startswith("cli-"):
        raise TokenError(f"a token acts as a CLI principal (cli-NAME), not {principal!r}")
    creds_path = auth_dir / CREDS_DIR / f"{principal}.json"
    try:
        creds = creds_path.read_bytes()
        msgspec.json.decode(creds, type=Credentials)
    except FileNotFoundError:
        raise TokenError(f"no credentials for {principal} at {creds_path}: `agentctl keys add cli "
                         f"{principal.removeprefix('cli-')}` first") from None
    except (OSError, msgspec.DecodeError) as exc:
        raise TokenError(f"{creds_path}: {exc}") from exc
    token_id, secret = secrets.token_urlsafe(6).replace("-", "x").replace("_", "y"), secrets.token_urlsafe(32)
    salt, nonce = os.urandom(16), os.urandom(12)
    sealed = AESGCM(_key(secret, salt)).encrypt(nonce, creds, token_id.encode())
    tokens = load(auth_dir)
    tokens[token_id] = Token(
        id=token_id, principal=principal, digest=hashlib.sha256(secret.encode()).hexdigest(),
        salt=base64.b64encode(salt).decode(), nonce=base64.b64encode(nonce).decode(),
        sealed=base64.b64encode(sealed).decode(), created_at=datetime.now(UTC).isoformat(), note=note)
    _save(auth_dir, tokens)
    return f"{PREFIX}{token_id}_{secret}"


def revoke(auth_dir: Path, token_id: str) -> Token | None:
    """Delete a token (its id, or the whole token); the entry removed, ``None`` if unknown."""
    token_id = parse(token_id)[0] if token_id.startswith(PREFIX) else token_id
    tokens = load(auth_dir)
    gone = tokens.pop(token_id, None)
    if gone is not None:
        _save(auth_dir, tokens)
    return gone


def parse(token: str) -> tuple[str, str]:
    """(id, secret) of a well-formed token; ``ValueError`` otherwise."""
    if not token.startswith(PREFIX):
        raise ValueError("not a ledgerbus token")
    token_id, sep, secret = token[len(PREFIX):].partition("_")
    if not sep or not token_id or not secret:
        raise ValueError("not a ledgerbus token")
    return token_id, secret


def open_token(tokens: dict[str, Token], token: str) -> tuple[Token, Credentials] | None:
    """The entry and the principal's credentials for a presented token, or ``None`` when it
    is malformed, unknown, revoked or wrong (the caller cannot tell which)."""
    try:
        token_id, secret = parse(token)
    except ValueError:
        return None
    entry = tokens.get(token_id)
    if entry is None or not hmac.compare_digest(entry.digest, hashlib.sha256(secret.encode()).hexdigest()):
        return None
    try:
        plain = AESGCM(_key(secret, base64.b64decode(entry.salt))).decrypt(
            base64.b64decode(entry.nonce), base64.b64decode(entry.sealed), token_id.encode())
        return entry, msgspec.json.decode(plain, type=Credentials)
    except Exception:  # noqa: BLE001 - a bad tag (InvalidTag), base64 or JSON: a tampered entry opens nothing
        return None


def describe(entry: Token) -> dict[str, str]:
    """What ``agentctl keys tokens`` shows of an entry (never its digest or seal)."""
    return {"id": entry.id, "principal": entry.principal, "created_at": entry.created_at, "note": entry.note}



