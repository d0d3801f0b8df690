"""The permissions nats.conf enforces are generated, not typed: the users file for a given
registry stays byte for byte what it was when bus/identity.py spelled every subject out
by hand (tests/golden/users.conf, written by that code), so building the subjects in
bus/subjects.py changed no principal's rights."""

from __future__ import annotations

from pathlib import Path

from bus.identity import Identity, Registry, identity

GOLDEN = Path(__file__).parent / "golden" / "users.conf"

# Every kind of principal; agents with no skill, one, and several (a dotted one among them).
IDENTITIES = [
    identity("admin"), identity("router"), identity("projector"), identity("cli", "alice"),
    identity("cli", "ops_2"), identity("agent", "lonely"), identity("agent", "echo-1", ["echo"]),
    identity("agent", "thinker-1", ["llm.chat", "plan", "a1.b-2.c.d", "reason"]),
]


def registry(identities: list[Identity]) -> Registry:
    """A registry of ``identities`` with fixed passwords, so its users file is reproducible."""
    reg = Registry(Path("/nonexistent"))
    for i, ident in enumerate(identities):
        reg.entries[ident.user] = (ident, f"pw-{i}")
    return reg


def test_the_users_file_is_byte_for_byte_what_the_hand_written_permissions_made() -> None:
    assert registry(IDENTITIES).users_conf() == GOLDEN.read_text()
