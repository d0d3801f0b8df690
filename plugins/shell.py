"""``shell``: run one allowlisted command in the task's workspace, under the sandbox.

Input: ``argv`` (list of strings, required), ``stdin`` (string), ``timeout_s`` (number,
capped by the task's deadline), ``cwd`` (a directory in the workspace), ``check`` (true: a
non-zero exit is an error). Output: ``exit_code``, ``signal``, ``stdout``, ``stderr``,
``truncated``, ``duration_s``, ``isolation``.

A non-zero exit is an output, not an error: the caller may want to see a failing test's
report. A command the policy refuses, or one a limit stopped, is the task's error.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from ledgerbus.agents import sandbox
from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.sandbox import SandboxPolicyFile
from ledgerbus.bus.agent_policy import SandboxPolicy
from ledgerbus.bus.settings import Settings

COMMON_FIELDS = ("stdin", "timeout_s", "check")
"""Input fields every sandboxed skill takes."""

_DEADLINE_MARGIN_S = 0.5
"""Time kept back from the task's deadline so a kill is reported before the runtime cancels."""
_SHOWN_CHARS = 80


class WorkspaceContext(Protocol):
    """What the sandboxed skills use of their :class:`agents.skill.SkillContext`."""

    @property
    def workspace(self) -> Path:
        """The task's own directory (with ``context/`` and ``output/``)."""
        ...

    @property
    def deadline(self) -> float:
        """``loop.time()`` by which the skill must finish."""
        ...

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """The task's logger, bound with its ids."""
        ...

    async def progress(self, message: str = "", fraction: float | None = None) -> None:
        """Report progress."""
        ...


class SandboxedSkill:
    """What the ``shell`` and ``python`` skills share: the sandbox policy, the input fields
    both take, and what a run becomes (an output, or the error of a stopped run).

    ``policy`` fixes the policy (tests); otherwise the ``[sandbox]`` table of
    ``policy_path`` (default: the ``LEDGERBUS_POLICY_PATH`` setting) is used, re-read when
    the file changes. A policy file that does not load raises ConfigError here, naming the key.
    """

    def __init__(self, policy: SandboxPolicy | None = None, policy_path: Path | None = None) -> None:
        if policy is not None and policy_path is not None:
            raise ValueError("give a sandbox policy or a policy_path to read it from, not both")
        self._source: SandboxPolicy | SandboxPolicyFile = (
            policy if policy is not None else SandboxPolicyFile(policy_path or Settings.from_env().policy_path)
        )

    def policy(self) -> SandboxPolicy:
        """The sandbox policy in force now."""
        return self._source.current() if isinstance(self._source, SandboxPolicyFile) else self._source

    async def _execute(
        self,
        ctx: WorkspaceContext,
        input: dict[str, Any],
        argv: list[str],
        *,
        cwd: str = ".",
        extra_programs: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Run ``argv`` with the common input fields applied; the skill's output, or SkillError."""
        policy = self.policy()
        stdin = input.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise SkillError(f"input.stdin must be a string, got {type(stdin).__name__}")
        check = input.get("check", False)
        if not isinstance(check, bool):
            raise SkillError(f"input.check must be true or false, got {check!r}")
        timeout = _timeout(ctx, input.get("timeout_s", policy.timeout_s))
        shown = _shown(argv)
        # A refused command never ran: refuse it before reporting that it runs.
        sandbox.check_paths(argv, ctx.workspace, [*policy.programs, *extra_programs])
        await ctx.progress(f"running {shown}")
        result = await sandbox.run(
            argv,
            workspace=ctx.workspace,
            policy=policy,
            timeout_s=timeout,
            stdin=None if stdin is None else stdin.encode(),
            cwd=cwd,
            extra_programs=extra_programs,
        )
        ctx.log.info(
            "sandboxed_command_finished",
            command=shown,
            exit_code=result.exit_code,
            killed=result.killed,
            isolation=result.isolation,
            duration_s=result.duration_s,
        )
        if result.killed is not None:
            raise SkillError(f"{shown}: {result.reason}")
        if check and result.exit_code != 0:
            last = result.stderr.strip().splitlines()[-1:] or ["no error output"]
            raise SkillError(f"{shown} exited with code {result.exit_code}: {last[0]}")
        return {
            "exit_code": result.exit_code,
            "signal": result.signal,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "truncated": result.stdout_truncated or result.stderr_truncated,
            "duration_s": result.duration_s,
            "isolation": result.isolation,
        }


def check_fields(input: dict[str, Any], known: Sequence[str]) -> None:
    """Refuse input fields the skill does not know: a misspelt ``timeout`` must not pass unseen."""
    unknown = sorted(set(input) - set(known))
    if unknown:
        raise SkillError(f"input has unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")


def _timeout(ctx: WorkspaceContext, requested: Any) -> float:
    if isinstance(requested, bool) or not isinstance(requested, int | float) or not requested > 0:
        raise SkillError(f"input.timeout_s must be a positive number of seconds, got {requested!r}")
    left = ctx.deadline - asyncio.get_running_loop().time() - _DEADLINE_MARGIN_S
    if left <= 0:
        raise SkillError("the task's deadline leaves no time to run the command")
    return min(float(requested), left)


def _shown(argv: list[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class ShellSkill(SandboxedSkill):
    """Run ``input["argv"]`` (no shell in between) in the task's workspace, sandboxed."""

    name = "shell"
    description = (
        "Run one allowlisted program with arguments (argv, no shell) in the task's workspace, sandboxed; "
        "returns exit_code, stdout and stderr."
    )
    capabilities = ("shell", "commands")
    """What plan steps naming capabilities may ask of it (the router matches on these)."""

    async def run(self, ctx: WorkspaceContext, input: dict[str, Any]) -> Any:
        """Validate the input, run the command and return how it ended."""
        check_fields(input, ("argv", "cwd", *COMMON_FIELDS))
        argv = input.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(arg, str) for arg in argv):
            raise SkillError(f"input.argv must be a non-empty list of strings, got {argv!r}")
        cwd = input.get("cwd", ".")
        if not isinstance(cwd, str):
            raise SkillError(f"input.cwd must be a directory path relative to the workspace, got {cwd!r}")
        return await self._execute(ctx, input, argv, cwd=cwd)
