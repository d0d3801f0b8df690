"""The project a command works in, found as git finds its repository.

A ledgerbus project is a directory holding ``nats.conf`` and ``policy.toml`` (what
``agentctl init`` writes, and this repository's root). Every relative path in the
settings (``var/``, ``policy.toml``, ``llm.toml``, ``profiles.toml``) and every file a
command reads by default resolves against it, never against the shell's directory, so
``agentctl tasks`` works from any subdirectory of the project.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ledgerbus.bus.errors import ConfigError

MARKERS = ("nats.conf", "policy.toml")
"""The files whose presence together makes a directory a project."""
HOME_ENV = "LEDGERBUS_HOME"


def is_project(path: Path) -> bool:
    """Whether ``path`` holds every marker file."""
    return all((path / name).is_file() for name in MARKERS)


def find_home(start: Path | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """``LEDGERBUS_HOME`` when set (it must be a project), else the nearest directory from
    ``start`` (the current one) upwards that is a project; ``None`` outside any project."""
    env = os.environ if env is None else env
    named = env.get(HOME_ENV)
    if named:
        home = Path(named).expanduser().resolve()
        if not is_project(home):
            raise ConfigError(f"{HOME_ENV}={named}: not a ledgerbus project (it needs {' and '.join(MARKERS)}; "
                              "`agentctl init DIR` makes one)")
        return home
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if is_project(candidate):
            return candidate
    return None


def outside_hint(home: Path | None) -> str:
    """What to add to a message about a missing local file when no project was found."""
    if home is not None:
        return ""
    return (f" (no ledgerbus project here or above: {' and '.join(MARKERS)} mark one; run `agentctl init DIR`, "
            f"cd into the project, or set {HOME_ENV})")
