"""Per-attempt workspaces: a directory of the task's own, where sandboxed commands run.

``<workspace_root>/<agent>/<task id>/<attempt>/`` holds ``context/`` (one ``<step>.json``
per dependency output of a plan step, so commands can read them as files) and ``output/``
(files the skill produces). Each attempt has its own: a task redelivered to the same agent
while an earlier attempt still runs (a skill that outlived AckWait) must not share, or
delete, the other's files. When the attempt ends its directory is removed, unless
``LEDGERBUS_KEEP_WORKSPACES`` keeps it (``failed``, the default: a failed attempt's
workspace stays for inspection; ``all``; ``none``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from pathlib import Path
from typing import Any

from ledgerbus.bus import codec, subjects

NONE = Path("/nonexistent/ledgerbus-no-workspace")
"""``ctx.workspace`` of a skill that said it uses none: a path nothing can be written to."""


def wanted(skill: object) -> bool:
    """Whether a skill needs a workspace: unless it declares ``uses_workspace = False`` (no
    files, no commands: echo, the LLM skills), every attempt gets one, made before it runs
    and removed after. Making and removing four directories costs a no-op task more than
    the rest of its agent-side work."""
    return bool(getattr(skill, "uses_workspace", True))


def path_for(root: Path, agent: str, task_id: str, attempt: int) -> Path:
    """The workspace of ``task_id``'s ``attempt`` on ``agent`` (names and ids are path-safe
    by schema)."""
    return root / agent / task_id / str(attempt)


def _make(path: Path, context: dict[str, Any]) -> None:
    if path.exists():
        shutil.rmtree(path)
    (path / "context").mkdir(parents=True)
    (path / "output").mkdir()
    (path / "tmp").mkdir()
    for step, output in context.items():
        if not re.fullmatch(subjects.ID_PATTERN, step):  # step ids are path-safe by schema; never trust a path
            continue
        (path / "context" / f"{step}.json").write_bytes(codec.encode(output))


async def make(root: Path, agent: str, task_id: str, attempt: int, context: dict[str, Any]) -> Path:
    """Create a fresh workspace for the attempt, with its dependency context written out."""
    path = path_for(root, agent, task_id, attempt)
    await asyncio.to_thread(_make, path, context)
    return path


def release(path: Path, failed: bool, keep: str) -> None:
    """Remove the workspace of an ended attempt unless ``keep`` says to keep it, and the
    task's directory once no attempt is left in it (synchronous: it runs on every way out
    of a task, cancellation included)."""
    if keep == "all" or (keep == "failed" and failed):
        return
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # another attempt's, or a kept one, is still there
        path.parent.rmdir()
