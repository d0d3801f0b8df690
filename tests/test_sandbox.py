"""The sandbox and the ``shell`` and ``python`` skills, with real subprocesses.

Each limit is tried under both isolation levels (bwrap is skipped, with the reason, where
it cannot make a sandbox). When the tests run as root the programs run as ``nobody``, so
the workspaces here live in a fresh directory under the system temp dir rather than under
pytest's private (mode 0700) ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.isolation import SCRUBBED_PATH, SandboxError, describe, isolation, probe_bwrap, sandbox_user
from ledgerbus.agents.sandbox import check_paths, load_policy, run
from ledgerbus.bus.agent_policy import DEFAULT_PROGRAMS, SandboxPolicy
from ledgerbus.bus.errors import ConfigError
from ledgerbus.plugins.python import PythonSkill, sandbox_python
from ledgerbus.plugins.shell import ShellSkill


@dataclass
class TaskContext:
    """The part of a SkillContext the sandboxed skills use, built directly."""

    workspace: Path
    deadline: float
    task_id: str = "task-sandbox-test"
    log: Any = field(default_factory=lambda: structlog.get_logger("test_sandbox"))
    reports: list[str] = field(default_factory=list)

    async def progress(self, message: str = "", fraction: float | None = None) -> None:
        self.reports.append(message)


def context(workspace: Path, seconds: float = 60.0) -> TaskContext:
    """A task context whose deadline is ``seconds`` from now."""
    return TaskContext(workspace=workspace, deadline=asyncio.get_running_loop().time() + seconds)


async def file_appears(path: Path, within_s: float = 10.0) -> None:
    """Wait for a file a sandboxed process writes: nothing else crosses the sandbox to wait on."""
    async with asyncio.timeout(within_s):
        while not path.exists():
            await asyncio.sleep(0.01)


@pytest.fixture(params=["rlimits", "bwrap"])
def level(request: pytest.FixtureRequest) -> str:
    """Each isolation level; bwrap only where it works."""
    if request.param == "bwrap" and not (probe := probe_bwrap()).usable:
        pytest.skip(f"bwrap isolation is unusable here: {probe.reason}")
    return str(request.param)


@pytest.fixture
def workspace() -> Iterator[Path]:
    """A task workspace (``context/``, ``output/``) the sandbox user can reach."""
    path = Path(tempfile.mkdtemp(prefix="ledgerbus-sandbox-test-"))
    (path / "context").mkdir()
    (path / "output").mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


def policy(level: str, **changes: Any) -> SandboxPolicy:
    """A policy at isolation ``level`` with ``changes`` to the defaults."""
    return msgspec.convert({"isolation": level, **changes}, SandboxPolicy)


def tasks_of(uid: int) -> int:
    """How many tasks (processes and threads, zombies included) ``uid`` has: what RLIMIT_NPROC counts."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue  # exited while we looked
        if int(fields["Uid"].split()[0]) == uid:
            count += int(fields["Threads"])
    return count


async def test_cpu_hog_is_stopped_at_its_cpu_limit(level: str, workspace: Path) -> None:
    skill = PythonSkill(policy(level, cpu_s=1))
    started = time.monotonic()
    with pytest.raises(SkillError, match=r"CPU time limit of 1s exceeded"):
        await skill.run(context(workspace), {"code": "while True:\n    pass\n"})
    assert time.monotonic() - started < 5


async def test_fork_bomb_is_stopped_by_the_process_limit_and_the_host_is_fine(level: str, workspace: Path) -> None:
    user = sandbox_user()
    # RLIMIT_NPROC counts every task of the user, so leave room for what it already runs.
    limit = tasks_of(os.getuid() if user is None else user[0]) + 16
    skill = PythonSkill(policy(level, nproc=limit))
    bomb = (
        "import os, time\n"
        "while True:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
    )
    started = time.monotonic()
    with pytest.raises(SkillError, match=rf"process limit of {limit} exceeded"):
        await skill.run(context(workspace), {"code": bomb})
    assert time.monotonic() - started < 5
    host = await asyncio.create_subprocess_exec("true")
    assert await asyncio.wait_for(host.wait(), 5) == 0


@pytest.mark.parametrize(
    "arg", ["../x", "context/../../x", "/etc/passwd", "--file=/etc/passwd", "--file=../x", "/"]
)
async def test_arguments_leaving_the_workspace_are_refused_before_running(
    level: str, workspace: Path, arg: str
) -> None:
    ctx = context(workspace)
    with pytest.raises(SandboxError, match=rf"argument 1 {arg!r}"):
        await ShellSkill(policy(level)).run(ctx, {"argv": ["cat", arg]})
    assert ctx.reports == []  # refused before anything ran


async def test_paths_inside_the_workspace_are_allowed(level: str, workspace: Path) -> None:
    (workspace / "context" / "note.txt").write_text("inside\n")
    skill = ShellSkill(policy(level))
    relative = await skill.run(context(workspace), {"argv": ["cat", "context/note.txt"]})
    absolute = await skill.run(context(workspace), {"argv": ["cat", str(workspace / "context" / "note.txt")]})
    assert relative["stdout"] == absolute["stdout"] == "inside\n"


async def test_writes_outside_the_workspace_hit_a_read_only_filesystem_under_bwrap(workspace: Path) -> None:
    if not (probe := probe_bwrap()).usable:
        pytest.skip(f"bwrap isolation is unusable here: {probe.reason}")
    outside = Path("/var/tmp") / f"ledgerbus-sandbox-escape-{uuid.uuid4().hex}"
    code = f"open({str(outside)!r}, 'w').write('escaped')\n"
    out = await PythonSkill(policy("bwrap")).run(context(workspace), {"code": code})
    assert out["exit_code"] == 1
    assert "Read-only file system" in out["stderr"]
    assert not outside.exists()
    write_inside = {"code": "open('output/r.txt', 'w').write('ok')"}
    inside = await PythonSkill(policy("bwrap")).run(context(workspace), write_inside)
    assert inside["exit_code"] == 0 and (workspace / "output" / "r.txt").read_text() == "ok"


async def test_rlimits_level_fences_writes_only_by_file_permissions(workspace: Path) -> None:
    """The rlimits level has no filesystem fence of its own: what the running user may write,
    the program may write. As root the program runs as nobody, which is what protects the
    agent's files there."""
    if sandbox_user() is None:
        pytest.skip("not root: under rlimits the program writes with the agent user's own permissions")
    protected = Path(tempfile.mkdtemp(prefix="ledgerbus-sandbox-root-"))
    open_to_all = Path(tempfile.mkdtemp(prefix="ledgerbus-sandbox-open-"))
    try:
        protected.chmod(0o755)
        open_to_all.chmod(0o1777)
        skill = PythonSkill(policy("rlimits"))
        code = "open({!r}, 'w').write('x')\n"
        denied = await skill.run(context(workspace), {"code": code.format(str(protected / "f"))})
        assert "PermissionError" in denied["stderr"] and not (protected / "f").exists()
        allowed = await skill.run(context(workspace), {"code": code.format(str(open_to_all / "f"))})
        assert allowed["exit_code"] == 0 and (open_to_all / "f").exists()
    finally:
        shutil.rmtree(protected)
        shutil.rmtree(open_to_all)


async def test_deadline_kills_the_process_group_including_grandchildren(level: str, workspace: Path) -> None:
    python = sandbox_python()
    # The subshell is a grandchild that outlives its parent sh; pids differ inside a pid
    # namespace, so a marker file it would write after 1s tells whether it was killed.
    code = (
        "import pathlib, subprocess, time\n"
        "subprocess.run(['/bin/sh', '-c', '(echo up > started; sleep 1; echo late > late) &'], check=True)\n"
        "while not pathlib.Path('started').exists():\n"
        "    time.sleep(0.01)\n"
        "time.sleep(30)\n"
    )
    result = await run(
        [python, "-c", code], workspace=workspace, policy=policy(level), timeout_s=0.5, extra_programs=(python,)
    )
    assert result.killed == "deadline"
    assert result.reason == "killed after 0.5s deadline (process group)"
    assert (workspace / "started").exists()
    await asyncio.sleep(1.2)  # past the moment the grandchild would have written its marker
    assert not (workspace / "late").exists()


async def test_cancelling_the_run_kills_the_program_and_its_grandchildren(level: str, workspace: Path) -> None:
    python = sandbox_python()
    code = (
        "import subprocess, time\n"
        "subprocess.run(['/bin/sh', '-c', '(echo up > started; sleep 1; echo late > late) &'], check=True)\n"
        "time.sleep(30)\n"
    )
    running = asyncio.create_task(
        run([python, "-c", code], workspace=workspace, policy=policy(level), extra_programs=(python,))
    )
    await file_appears(workspace / "started")  # the grandchild is up: now cancel the run
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.sleep(1.2)  # past the moment the grandchild would have written its marker
    assert not (workspace / "late").exists()


async def test_task_deadline_caps_the_requested_timeout(level: str, workspace: Path) -> None:
    started = time.monotonic()
    with pytest.raises(SkillError, match=r"killed after [\d.]+s deadline \(process group\)"):
        await PythonSkill(policy(level)).run(
            context(workspace, seconds=1.5), {"code": "import time\ntime.sleep(30)\n", "timeout_s": 30}
        )
    assert time.monotonic() - started < 2


async def test_program_not_on_the_allowlist_is_refused(level: str, workspace: Path) -> None:
    allowed = ", ".join(DEFAULT_PROGRAMS)
    expected = f"program 'rm' is not allowed by policy [sandbox] programs (allowed: {allowed})"
    with pytest.raises(SandboxError) as refused:
        await ShellSkill(policy(level)).run(context(workspace), {"argv": ["rm", "-rf", "output"]})
    assert str(refused.value) == expected
    assert (workspace / "output").is_dir()


def test_allowed_name_does_not_allow_another_file_of_that_name(workspace: Path) -> None:
    with pytest.raises(SandboxError, match=r"program '/tmp/evil/cat' is not allowed"):
        check_paths(["/tmp/evil/cat"], workspace, ["cat"])
    with pytest.raises(SandboxError, match=r"program './cat' must be a name looked up on PATH or an absolute path"):
        check_paths(["./cat"], workspace, ["cat"])
    assert check_paths([shutil.which("cat", path=SCRUBBED_PATH) or "cat"], workspace, ["cat"]).endswith("/cat")


async def test_output_beyond_output_bytes_is_truncated_and_marked(level: str, workspace: Path) -> None:
    code = "import sys\nsys.stdout.write('x' * 1_000_000)\nsys.stderr.write('e' * 10)\n"
    out = await PythonSkill(policy(level, output_bytes=100)).run(context(workspace), {"code": code})
    assert out["exit_code"] == 0
    assert out["stdout"] == "x" * 100
    assert out["stderr"] == "e" * 10
    assert out["truncated"] is True
    result = await run(
        [sandbox_python(), "-c", code],
        workspace=workspace,
        policy=policy(level, output_bytes=100),
        extra_programs=(sandbox_python(),),
    )
    assert result.stdout_truncated and not result.stderr_truncated


async def test_environment_is_scrubbed(level: str, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGERBUS_SECRET_TEST", "s3cret")
    code = "import json, os\nprint(json.dumps(dict(os.environ)))\n"
    out = await PythonSkill(policy(level, env={"GREETING": "hello"})).run(context(workspace), {"code": code})
    env = json.loads(out["stdout"])
    assert "LEDGERBUS_SECRET_TEST" not in env
    assert env["PATH"] == SCRUBBED_PATH
    assert env["HOME"] == str(workspace.resolve())
    assert env["TMPDIR"] == str(workspace.resolve() / "tmp")
    assert env["LANG"] == "C.UTF-8"
    assert env["GREETING"] == "hello"


async def test_stdin_is_passed_through(level: str, workspace: Path) -> None:
    skill = ShellSkill(policy(level))
    out = await skill.run(context(workspace), {"argv": ["cat"], "stdin": "hello\nworld\n"})
    assert out["stdout"] == "hello\nworld\n"
    counted = await skill.run(context(workspace), {"argv": ["wc", "-l"], "stdin": "a\nb\nc\n"})
    assert counted["stdout"].strip() == "3"


async def test_non_zero_exit_is_reported_not_raised_unless_checked(level: str, workspace: Path) -> None:
    skill = ShellSkill(policy(level))
    ctx = context(workspace)
    out = await skill.run(ctx, {"argv": ["grep", "needle"], "stdin": "haystack\n"})
    assert out["exit_code"] == 1 and out["signal"] is None and out["isolation"] == level
    assert ctx.reports == ["running grep needle"]
    with pytest.raises(SkillError, match=r"^false exited with code 1"):
        await skill.run(ctx, {"argv": ["false"], "check": True})


@pytest.mark.parametrize(
    ("limits", "code", "reason"),
    [
        ({"memory_mb": 256}, "b = bytearray(1024 ** 3)\n", "memory limit of 256 MB exceeded"),
        ({"file_mb": 1}, "open('big', 'wb').write(b'x' * 2 * 1024 ** 2)\n", "file size limit of 1 MB exceeded"),
    ],
)
async def test_memory_and_file_size_limits_stop_the_program(
    level: str, workspace: Path, limits: dict[str, int], code: str, reason: str
) -> None:
    with pytest.raises(SkillError, match=reason):
        await PythonSkill(policy(level, **limits)).run(context(workspace), {"code": code})


async def test_bwrap_has_no_network(workspace: Path) -> None:
    if not (probe := probe_bwrap()).usable:
        pytest.skip(f"bwrap isolation is unusable here: {probe.reason}")
    code = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n"
    out = await PythonSkill(policy("bwrap")).run(context(workspace), {"code": code})
    assert out["exit_code"] == 1 and "Network is unreachable" in out["stderr"]


def test_describe_reports_the_level_the_limits_and_bwrap(level: str) -> None:
    described = describe(policy(level, cpu_s=3, nproc=50))
    assert described["isolation"] == isolation(policy(level)) == level
    assert described["error"] is None
    assert described["limits"]["cpu_s"] == 3 and described["limits"]["nproc"] == 50
    assert set(described["bwrap"]) == {"path", "version", "usable", "reason"}
    fence = "read-only filesystem except the workspace and a private /tmp"
    assert (fence in described["enforced"]) == (level == "bwrap")


def test_policy_demanding_bwrap_where_it_does_not_work_is_a_clear_error() -> None:
    if probe_bwrap().usable:
        pytest.skip("bwrap works here: the refusal shows only where it does not")
    with pytest.raises(SandboxError, match=r'policy \[sandbox\] isolation = "bwrap", but bwrap'):
        isolation(policy("bwrap"))


def test_load_policy_reads_only_the_sandbox_table(tmp_path: Path) -> None:
    assert load_policy(tmp_path / "missing.toml") == SandboxPolicy()
    path = tmp_path / "policy.toml"
    path.write_text('[approval]\nskills = ["shell"]\n\n[sandbox]\nprograms = ["cat"]\ncpu_s = 2\ntimeout_s = 5\n')
    loaded = load_policy(path)
    assert loaded.programs == ("cat",) and loaded.cpu_s == 2 and loaded.timeout_s == 5.0
    assert loaded.nproc == SandboxPolicy().nproc


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('cpu_s = "ten"', "sandbox.cpu_s"),
        ("cpu_s = 0", "sandbox.cpu_s"),
        ('isolation = "docker"', "sandbox.isolation"),
        ("cpus = 1", "unknown field `cpus`"),
        ('programs = ["bin/cat"]', "programs entry 'bin/cat'"),
        ('env = { "A=B" = "c" }', "env entry 'A=B'"),
    ],
)
def test_load_policy_names_the_bad_key(tmp_path: Path, table: str, named: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f"[sandbox]\n{table}\n")
    with pytest.raises(ConfigError, match=named):
        load_policy(path)


async def test_shell_skill_rereads_the_policy_file_when_it_changes(tmp_path: Path, workspace: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[sandbox]\nisolation = "rlimits"\nprograms = ["echo"]\n')
    skill = ShellSkill(policy_path=path)
    assert (await skill.run(context(workspace), {"argv": ["echo", "hi"]}))["stdout"] == "hi\n"
    with pytest.raises(SandboxError, match="program 'true' is not allowed"):
        await skill.run(context(workspace), {"argv": ["true"]})
    path.write_text('[sandbox]\nisolation = "rlimits"\nprograms = ["echo", "true"]\n')
    assert (await skill.run(context(workspace), {"argv": ["true"]}))["exit_code"] == 0
    path.write_text("[sandbox]\ncpu_s = -1\n")  # broken: the previous policy stays
    assert (await skill.run(context(workspace), {"argv": ["true"]}))["exit_code"] == 0


async def test_skill_reads_the_policy_file_named_by_the_settings(
    tmp_path: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text('[sandbox]\nisolation = "rlimits"\nprograms = ["true"]\n')
    monkeypatch.setenv("LEDGERBUS_POLICY_PATH", str(path))
    skill = ShellSkill()
    assert skill.policy().programs == ("true",)
    with pytest.raises(SandboxError, match=r"program 'echo' is not allowed .* \(allowed: true\)"):
        await skill.run(context(workspace), {"argv": ["echo"]})


@pytest.mark.parametrize(
    ("input", "message"),
    [
        ({"argv": []}, "input.argv must be a non-empty list of strings"),
        ({"argv": ["echo", 1]}, "input.argv must be a non-empty list of strings"),
        ({"argv": ["echo"], "timeout_s": 0}, "input.timeout_s must be a positive number"),
        ({"argv": ["echo"], "timeout_s": True}, "input.timeout_s must be a positive number"),
        ({"argv": ["echo"], "stdin": 5}, "input.stdin must be a string"),
        ({"argv": ["echo"], "check": "yes"}, "input.check must be true or false"),
        ({"argv": ["echo"], "cwd": "../"}, "cwd '../' must be a path relative to the workspace"),
        ({"argv": ["echo"], "cwd": "nowhere"}, "cwd 'nowhere' is not a directory in the workspace"),
        ({"argv": ["echo"], "timeout": 5}, r"input has unknown field\(s\) timeout"),
    ],
)
async def test_shell_skill_input_errors_name_the_field(workspace: Path, input: dict[str, Any], message: str) -> None:
    with pytest.raises(SkillError, match=message):
        await ShellSkill(policy("rlimits")).run(context(workspace), input)


async def test_python_skill_needs_code(workspace: Path) -> None:
    with pytest.raises(SkillError, match="input.code must be a non-empty string of Python"):
        await PythonSkill(policy("rlimits")).run(context(workspace), {"code": "  "})


async def test_python_skill_replaces_a_planted_symlink_instead_of_following_it(workspace: Path) -> None:
    victim = workspace / "context" / "victim.txt"
    victim.write_text("untouched")
    (workspace / "main.py").symlink_to(victim)
    out = await PythonSkill(policy("rlimits")).run(context(workspace), {"code": "print('ran')"})
    assert out["stdout"] == "ran\n" and victim.read_text() == "untouched"

