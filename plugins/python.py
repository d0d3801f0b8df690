"""``python``: run a Python snippet in the task's workspace, under the sandbox.

Input: ``code`` (string, required), ``stdin``, ``timeout_s``, ``check`` (as for ``shell``).
The snippet is written to ``main.py`` in the workspace and run in isolated mode
(``python -I main.py``: no PYTHON* variables, no user site-packages). The interpreter is
allowed for this skill without being on the ``[sandbox] programs`` list. Output as for
``shell``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.isolation import SCRUBBED_PATH, unreachable
from ledgerbus.plugins.shell import COMMON_FIELDS, SandboxedSkill, WorkspaceContext, check_fields


def sandbox_python() -> str:
    """The interpreter snippets run on: this agent's own, or the system's ``python3`` when the
    sandbox user cannot run the agent's (an agent run as root from a private home directory)."""
    reasons = []
    for candidate in (sys.executable, shutil.which("python3", path=SCRUBBED_PATH)):
        if candidate:
            why = unreachable(Path(candidate), execute=True)
            if why is None:
                return candidate
            reasons.append(why)
    raise SkillError(f"no Python interpreter the sandbox user can run: {'; '.join(reasons) or 'none found'}")


def write_script(path: Path, code: str) -> None:
    """Write ``code`` to a fresh file at ``path``.

    An earlier run in the same workspace may have left a symlink there pointing outside it:
    this write is the agent's own, so it replaces the entry instead of following it.
    """
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise SkillError(f"cannot write the snippet to {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as script:
        script.write(code)


class PythonSkill(SandboxedSkill):
    """Run ``input["code"]`` with Python in the task's workspace, sandboxed."""

    name = "python"
    description = (
        "Run a Python snippet (code) in the task's workspace, sandboxed; returns exit_code, stdout and stderr."
    )
    capabilities = ("python", "code")
    """What plan steps naming capabilities may ask of it (the router matches on these)."""

    async def run(self, ctx: WorkspaceContext, input: dict[str, Any]) -> Any:
        """Write the snippet to ``main.py`` and run it."""
        check_fields(input, ("code", *COMMON_FIELDS))
        code = input.get("code")
        if not isinstance(code, str) or not code.strip():
            raise SkillError(f"input.code must be a non-empty string of Python, got {code!r}")
        interpreter = sandbox_python()
        write_script(ctx.workspace / "main.py", code)
        return await self._execute(ctx, input, [interpreter, "-I", "main.py"], extra_programs=(interpreter,))
