"""The tables of the policy file (``policy.toml``) that agents read: ``[sandbox]`` (what
the shell and python skills may run, and how confined) and ``[hooks]`` (deny rules,
disabled plugin hooks).

They live here, below both readers: the router embeds them in its own policy so that the
whole file is checked when it loads, and each agent reads just its tables
(:func:`read_table`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import msgspec

from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.problems import explain

T = TypeVar("T")

DEFAULT_PROGRAMS = ("cat", "echo", "printf", "ls", "grep", "wc", "head", "tail", "cut", "tr", "diff", "true", "false")
"""Programs that read files and print; none of them runs other programs or takes code.

Shells, interpreters and programs that run others (sh, python3, awk, sed, find, xargs,
env, sort) are left out: what they run hides in their arguments, where the path checks
cannot see. Add them in policy.toml where bwrap isolation is in force.
"""


class SandboxPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``[sandbox]`` table of policy.toml: what may run, and the limits it runs under."""

    programs: tuple[str, ...] = DEFAULT_PROGRAMS
    """Allowed programs: names looked up on the scrubbed PATH, or exact absolute paths."""
    isolation: Literal["auto", "bwrap", "rlimits"] = "auto"
    """``auto``: bwrap when it works on this machine, else rlimits."""
    cpu_s: Annotated[int, msgspec.Meta(ge=1)] = 10
    """CPU seconds per process (RLIMIT_CPU): SIGXCPU then, SIGKILL a second later."""
    memory_mb: Annotated[int, msgspec.Meta(ge=1)] = 1024
    """Address space per process (RLIMIT_AS)."""
    file_mb: Annotated[int, msgspec.Meta(ge=1)] = 64
    """Largest file a process may write (RLIMIT_FSIZE)."""
    nproc: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Processes of the running user (RLIMIT_NPROC; counts all of that user's processes)."""
    nofile: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Open files per process (RLIMIT_NOFILE)."""
    output_bytes: Annotated[int, msgspec.Meta(ge=1)] = 64 * 1024
    """Most bytes kept of each of stdout and stderr; the rest is read and dropped."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Wall-clock deadline when the caller gives none."""
    env: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra environment variables; everything else of the agent's environment is withheld."""

    def __post_init__(self) -> None:
        for program in self.programs:
            if not program or "\0" in program or ("/" in program and not program.startswith("/")):
                raise ValueError(f"programs entry {program!r} must be a program name or an absolute path")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"env entry {key!r} must be a variable name without '=' and without NUL bytes")


class DenyRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Veto tasks of ``skills`` whose input matches ``match`` (a regular expression)."""

    match: str
    skills: list[str] = msgspec.field(default_factory=lambda: ["*"])
    reason: str = ""


class HooksPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[hooks]`` table of the policy file."""

    deny: list[DenyRule] = msgspec.field(default_factory=list)
    disabled: list[str] = msgspec.field(default_factory=list)
    """names of plugin hooks not to run"""


def read_table(path: Path, name: str, kind: type[T]) -> T:
    """The ``[name]`` table of the policy file at ``path`` as ``kind``; a missing file or
    table means ``kind``'s defaults, a bad value a :class:`ConfigError` naming the key."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return kind()
    except OSError as exc:
        raise ConfigError(f"policy {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"policy {path}: not UTF-8 text: {exc}") from exc
    try:
        table = tomllib.loads(text).get(name, {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy {path}: {exc}") from exc
    if not isinstance(table, dict):
        raise ConfigError(f"policy {path}: {name} must be a table, got {type(table).__name__}")
    try:
        return msgspec.convert(table, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"policy {path} [{name}]: {explain(exc).at(name)}") from exc
