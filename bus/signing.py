"""Ed25519 keys and signatures for the router's audit checkpoints.

The router's private key lives in a PEM file readable only by its owner, made on first
start; the public key is written beside it (``.pub``, hex) for whoever verifies the log.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledgerbus.bus import codec
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.records import ArchiveSeal, Checkpoint

Signed = TypeVar("Signed", Checkpoint, ArchiveSeal)
"""A statement of the router's: a struct with ``key_id`` and ``signature`` fields."""


def public_path(key_path: Path) -> Path:
    """Where the public key of ``key_path`` is written."""
    return key_path.with_suffix(".pub")


def load_or_create(key_path: Path) -> Ed25519PrivateKey:
    """The router's signing key, made (with its ``.pub``) if there is none yet."""
    if key_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"router key {key_path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"router key {key_path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    key_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path(key_path).write_text(public_hex(key) + "\n")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    """The raw public key, hex."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(public: str) -> str:
    """A short name for a public key (hex): the first 16 hex digits of its sha256."""
    return hashlib.sha256(bytes.fromhex(public)).hexdigest()[:16]


def load_public(path: Path) -> str:
    """A public key written by :func:`load_or_create` (hex), validated."""
    try:
        text = path.read_text().strip()
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"public key {path}: {exc}") from exc
    return text


def _signed_bytes(cp: Checkpoint | ArchiveSeal) -> bytes:
    return codec.encode(msgspec.structs.replace(cp, signature=""))


def sign(key: Ed25519PrivateKey, cp: Signed) -> Signed:
    """``cp`` with its ``key_id`` and ``signature`` filled in."""
    cp = msgspec.structs.replace(cp, key_id=key_id(public_hex(key)), signature="")
    return msgspec.structs.replace(cp, signature=key.sign(_signed_bytes(cp)).hex())


def valid(public: str, cp: Checkpoint | ArchiveSeal) -> bool:
    """Whether ``cp`` was signed by the key ``public`` (hex)."""
    if cp.key_id != key_id(public):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(bytes.fromhex(cp.signature), _signed_bytes(cp))
    except (InvalidSignature, ValueError):
        return False
    return True
