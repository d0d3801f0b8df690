"""Agent profiles: named agent configurations in ``profiles.toml`` (``LEDGERBUS_PROFILES_PATH``).

A profile says what an agent started with ``agentctl agent --profile NAME`` serves and how::

    [profiles.developer]
    instructions = "You write the code the architecture describes."
    skills = ["llm.chat"]               # the skills it serves (the first is its main one)
    capabilities = ["python"]           # optional: advertised with every skill, for matching
    handoffs = ["qa"]                   # optional: the roles it hands its work to
    guardrails = ["Never push to main"] # optional: rules its instructions must not break
    concurrency = 2                     # optional, default 1

    [profiles.developer.checks]         # optional: guardrails checked on its output
    must_not_match = ['(?i)password *=']  # (agents/guardrails.py)

The file is decoded strictly (unknown fields are errors); every error names the file and
the profile. :func:`add` appends a profile (an approved proposal) without touching the
profiles already there, and never replaces one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import msgspec

from ledgerbus.agents.errors import AgentError
from ledgerbus.agents.guardrails import Checks
from ledgerbus.bus.problems import explain
from ledgerbus.bus.subjects import NAME_PATTERN, SKILL_PATTERN

ProfileName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="an agent name: a-z 0-9 _ -")]
_Skill = Annotated[str, msgspec.Meta(pattern=SKILL_PATTERN)]
_Capability = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
_Rule = Annotated[str, msgspec.Meta(max_length=4096)]


class ProfileError(AgentError):
    """The profiles file cannot be read, is not valid, or cannot take a new profile."""


class ProfileNotFound(ProfileError):
    """The profiles file has no profile of that name; the message lists the known ones."""


class Profile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One agent configuration (see the module docstring)."""

    instructions: Annotated[str, msgspec.Meta(max_length=16_384)]
    skills: Annotated[list[_Skill], msgspec.Meta(min_length=1, max_length=256)]
    capabilities: Annotated[list[_Capability], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    handoffs: Annotated[list[ProfileName], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    guardrails: Annotated[list[_Rule], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    checks: Checks | None = None
    """The part of the guardrails a machine holds the output to (:mod:`agents.guardrails`)."""


class ProfilesFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything ``profiles.toml`` may say."""

    profiles: dict[ProfileName, Profile] = msgspec.field(default_factory=dict)


_NEW_FILE = ("# Agent profiles: `agentctl agent --profile NAME` runs one; `agentctl agents propose --approve ID`\n"
             "# adds one. See docs/orchestration-profiles.md.\n")


def parse(data: bytes, path: Path) -> ProfilesFile:
    """Decode the text of a profiles file; :class:`ProfileError` names ``path`` and where."""
    try:
        return msgspec.toml.decode(data, type=ProfilesFile)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"profiles {path}: {_locate(data, exc)}") from exc
    except msgspec.DecodeError as exc:
        raise ProfileError(f"profiles {path}: {explain(exc, 'TOML')}") from exc


def _locate(data: bytes, exc: msgspec.ValidationError) -> str:
    """The error with the profile's name in its path: msgspec says ``$.profiles[...]``
    for any of them, so find the one that fails and say which."""
    problem = explain(exc)
    if not problem.path.startswith("$.profiles[...]"):
        return problem.at("")
    raw = msgspec.toml.decode(data)
    for name, body in (raw.get("profiles") or {}).items():
        try:
            msgspec.convert(body, Profile)
        except msgspec.ValidationError as inner:
            return explain(inner).at(f"profiles.{name}")
    return problem.at("")


def load(path: Path, missing_ok: bool = False) -> ProfilesFile:
    """Read and validate the profiles file (empty when it does not exist and ``missing_ok``)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        if missing_ok:
            return ProfilesFile()
        raise ProfileError(f"no profiles file at {path} (set LEDGERBUS_PROFILES_PATH)") from exc
    except OSError as exc:
        raise ProfileError(f"profiles {path}: {exc.strerror}") from exc
    return parse(data, path)


def get(path: Path, name: str) -> Profile:
    """The profile ``name``; :class:`ProfileNotFound` lists the profiles there are."""
    profiles = load(path).profiles
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ProfileNotFound(f"no profile {name!r} in {path} (known: {known})")
    return profiles[name]


def render(name: str, profile: Profile) -> str:
    """``profile`` as a ``[profiles.<name>]`` TOML table."""
    lines = [f"[profiles.{name}]", f"instructions = {_string(profile.instructions)}",
             f"skills = {_strings(profile.skills)}"]
    for field in ("capabilities", "handoffs", "guardrails"):
        if values := getattr(profile, field):
            lines.append(f"{field} = {_strings(values)}")
    if profile.concurrency != 1:
        lines.append(f"concurrency = {profile.concurrency}")
    return "\n".join(lines) + "\n"


def _string(value: str) -> str:
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _strings(values: list[str]) -> str:
    return "[" + ", ".join(_string(v) for v in values) + "]"


def add(path: Path, name: str, profile: Profile) -> None:
    """Append profile ``name`` to the file (made if missing); the file's other contents,
    comments included, stay as they are. A profile of that name already there is an
    error: nothing is replaced. The new text is validated before the file is replaced."""
    try:
        text = path.read_text() if path.exists() else _NEW_FILE
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profiles {path}: {exc}") from exc
    existing = parse(text.encode(), path)
    if name in existing.profiles:
        raise ProfileError(f"profile {name!r} already exists in {path}; it is never replaced")
    if text and not text.endswith("\n"):
        text += "\n"
    text += "\n" + render(name, profile)
    written = parse(text.encode(), path).profiles.get(name)
    if written != profile:
        raise ProfileError(f"profile {name!r} would not read back as written in {path}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise ProfileError(f"profiles {path}: {exc.strerror or exc}") from exc
