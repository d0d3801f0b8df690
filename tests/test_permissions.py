"""The permissions nats.conf enforces are generated, not typed: the users file for a given
registry stays byte for byte tests/golden/users.conf, first written when bus/identity.py
spelled every subject out by hand, so building the subjects in bus/subjects.py changed no
principal's rights. Changed on purpose since, and reviewed line by line: work assigned to
one agent (``assign.<name>.>``, its own consumer), and WORK consumers created only through
the API subject that names their filter (no legacy durable create, whose filter the server
does not check); metrics snapshots (``metrics.<principal>.*``, each its own), which a CLI
principal reads with the sizes of the streams and of WORK's consumers; the router's own
``snapshots`` object store (router/snapshots.py), which no other principal may read or
write; the ``projections`` object store (projections/snapshots.py), which the projector
writes and prunes and a CLI principal reads (``agentctl replay``), both reading one AUDIT
record by sequence to check a snapshot against the log; recorded LLM calls
(``llmcalls.<sha256>``, agents/llm/calls.py), which agents and CLI principals store and read
by hash, the router provisioning their stream (LLMCALLS)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from ledgerbus.bus import identity as identity_mod
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.identity import REGISTRY_FILE, Identity, Registry, identity

GOLDEN = Path(__file__).parent / "golden" / "users.conf"

# Every kind of principal; agents with no skill, one, and several (a dotted one among them).
IDENTITIES = [
    identity("admin"), identity("router"), identity("projector"), identity("cli", "alice"),
    identity("cli", "ops_2"), identity("agent", "lonely"), identity("agent", "echo-1", ["echo"]),
    identity("agent", "thinker-1", ["llm.chat", "plan", "a1.b-2.c.d", "reason"]),
]


def registry(identities: list[Identity], directory: Path = Path("/nonexistent")) -> Registry:
    """A registry of ``identities`` with fixed passwords, so its users file is reproducible."""
    reg = Registry(directory)
    for i, ident in enumerate(identities):
        reg.entries[ident.user] = (ident, f"pw-{i}")
    return reg


def test_the_users_file_is_byte_for_byte_what_the_hand_written_permissions_made() -> None:
    assert registry(IDENTITIES).users_conf() == GOLDEN.read_text()


def test_a_registry_saved_and_loaded_back_makes_the_same_users_file(tmp_path: Path) -> None:
    registry(IDENTITIES, tmp_path).save()
    assert (tmp_path / "users.conf").read_text() == GOLDEN.read_text()
    assert Registry.load(tmp_path).users_conf() == GOLDEN.read_text()


def test_a_registry_row_whose_name_is_not_a_subject_token_is_refused(tmp_path: Path) -> None:
    # Hand-edited: "*" would have become in.agent.*.>, speaking as every agent.
    row = {"kind": "agent", "name": "*", "skills": ["echo"], "password": "pw"}
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"principals": [row]}))
    with pytest.raises(ConfigError, match=REGISTRY_FILE):
        Registry.load(tmp_path)


def test_identity_types_no_subject_of_its_own() -> None:
    # Subjects, streams and API patterns come from bus/subjects.py; a literal here would
    # be a second spelling that can drift from the one the code publishes on.
    tree = ast.parse(Path(identity_mod.__file__).read_text())
    shapes = ("$JS", "$KV", "_INBOX", "in.", "audit.", "work.", "notify.", "q.", "traces.", "metrics.", "KV_")
    streams = {"INGRESS", "AUDIT", "WORK", "DEADLETTERS", "TRACES", "METRICS"}
    literals = [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and (node.value.startswith(shapes) or node.value in streams)
    ]
    assert literals == []


def test_the_repositorys_procfile_makes_an_identity_for_every_agent_it_starts_the_team_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledgerbus.agentctl.processes import _profile_skills
    from ledgerbus.bus.identity import ensure_local
    from tests.support import REPO

    monkeypatch.setenv("LEDGERBUS_PROFILES_PATH", str(REPO / "profiles.toml"))
    assert ensure_local(tmp_path, "ada", REPO / "Procfile", _profile_skills)
    entries = Registry.load(tmp_path).entries
    agents = {user: set(ident.skills) for user, (ident, _) in entries.items() if ident.kind == "agent"}
    team = ("product-manager", "architect", "developer", "qa", "backend", "frontend", "devops", "testing")
    assert {f"agent-{name}": {"llm.chat"} for name in team}.items() <= agents.items()
    assert agents["agent-echo-1"] == {"echo"} and agents["agent-thinker-1"] == {"llm.chat", "plan", "reason"}
    assert not ensure_local(tmp_path, "ada", REPO / "Procfile", _profile_skills), "nothing more to add"
