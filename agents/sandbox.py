"""Run a command the way a skill may: allowlisted, confined, limited and killed on time.

Two isolation levels, chosen by the ``[sandbox]`` table of the policy file:

- ``bwrap`` (bubblewrap): the filesystem is read-only except the task's workspace and a
  private ``/tmp``; no network; private pid, ipc and uts namespaces, so everything the
  program started dies with the run. Plus the rlimits below.
- ``rlimits``: resource limits, a new session (process group) that is killed at the
  deadline and when the program exits, and a scrubbed environment. Writes and network are
  limited only by the permissions of the user the program runs as.

Both levels run the program as an unprivileged user when the agent runs as root: root
ignores ``RLIMIT_NPROC`` (the kernel exempts uid 0), so a fork bomb would only be stopped by
the deadline, and root could write anywhere the rlimits level does not fence off. The
workspace is handed to that user (``nobody``) before each run.

``RLIMIT_NPROC`` counts every process of the user the program runs as, not only the
sandbox's: run agents as a dedicated user, and concurrent runs share one budget. Killed
processes that the run orphaned are reaped by the system's init and count until then (a
lazy init keeps them for a second or so).

Under rlimits, a process that leaves its process group (``setsid``, ``setpgid``) escapes
the kill; bwrap's pid namespace leaves no such gap.
"""

from __future__ import annotations

import asyncio
import functools
import os
import resource
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

import msgspec
import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ledgerbus.agents.isolation import (
    SCRUBBED_PATH,
    Isolation,
    SandboxError,
    bwrap_options,
    isolation,
    probe_bwrap,
    run_as,
    sandbox_user,
    unreachable,
)
from ledgerbus.bus.agent_policy import SandboxPolicy, read_table
from ledgerbus.bus.errors import ConfigError

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("ledgerbus.sandbox")

Limit = Literal["deadline", "cpu", "memory", "file_size", "processes", "sigkill"]
"""Which limit stopped a program (``sigkill``: killed from outside, see :func:`run`)."""



_CHUNK = 64 * 1024
_TAIL_BYTES = 2048
_DRAIN_S = 1.0
"""How long output may keep flowing after the program ended and its group was killed."""
_MEMORY_MARKS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_PROCESS_MARKS = ("Cannot fork", "can't start new thread", "Creating new namespace failed: Resource temporarily")


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a sandboxed run ended and what it printed."""

    argv: list[str]
    exit_code: int
    """The exit status; 128 + N when the program died of signal N (as shells report it)."""
    signal: str | None
    """The signal that ended the program (``SIGXCPU``), if one did."""
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float
    isolation: Isolation
    killed: Limit | None = None
    """The limit that stopped the program, where that is detectable."""
    reason: str | None = None
    """Why, for a person: ``"CPU time limit of 1s exceeded"``."""


def load_policy(path: Path) -> SandboxPolicy:
    """Read the ``[sandbox]`` table of a policy file (other tables are the router's):
    defaults if there is none, a :class:`ConfigError` naming the key for a bad value."""
    return read_table(path, "sandbox", SandboxPolicy)


class SandboxPolicyFile:
    """The ``[sandbox]`` policy of a file, re-read when the file changes.

    As with the router's policy: a file that fails to load at first raises; one that later
    breaks or disappears leaves the previous policy in force, so breaking the file never
    loosens the sandbox.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = _file_stamp(path)
        self._policy = load_policy(path)

    def current(self) -> SandboxPolicy:
        """The policy in force, re-read first if the file changed since it was last read."""
        stamp = _file_stamp(self.path)
        if stamp is not None and stamp != self._stamp:
            try:
                self._policy = load_policy(self.path)
                log.info("sandbox_policy_reloaded", path=str(self.path))
            except ConfigError as exc:
                log.error("sandbox_policy_reload_failed", error=str(exc), keeping="the previous policy")
            self._stamp = stamp
        return self._policy


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def check_paths(argv: Sequence[str], workspace: Path, programs: Sequence[str]) -> str:
    """Refuse what the policy forbids before anything runs; return the program's absolute path.

    ``argv[0]`` must be on ``programs`` (by name, looked up on the scrubbed PATH, or by exact
    absolute path). No argument may be an absolute path outside the workspace or have a
    ``..`` component (nor may the value of a ``--flag=value``). Under rlimits this is the
    only fence around the filesystem, and it cannot see into what a program reads from its
    arguments: keep shells and interpreters off the list there.
    """
    if not argv:
        raise SandboxError("argv is empty: there is no program to run")
    program = _allowed_program(argv[0], programs)
    roots = {Path(os.path.abspath(workspace)), workspace.resolve()}
    for index, arg in enumerate(argv[1:], start=1):
        if "\0" in arg:
            raise SandboxError(f"argument {index} {arg!r} contains a NUL byte")
        candidates = [arg]
        if arg.startswith("-") and "=" in arg:
            candidates.append(arg.split("=", 1)[1])
        for candidate in candidates:
            if ".." in PurePosixPath(candidate).parts:
                raise SandboxError(
                    f"argument {index} {arg!r} has a '..' path component: paths must stay in the workspace"
                )
            if candidate.startswith("/"):
                target = Path(os.path.normpath(candidate))
                if not any(target.is_relative_to(root) for root in roots):
                    raise SandboxError(
                        f"argument {index} {arg!r} is an absolute path outside the workspace {workspace}"
                    )
    return program


def _allowed_program(name: str, programs: Sequence[str]) -> str:
    """The absolute path ``name`` runs, if the allowlist allows it.

    A bare name on the list allows only what PATH lookup finds for it, never another file of
    the same name (``/tmp/x/cat``).
    """
    refused = SandboxError(
        f"program {name!r} is not allowed by policy [sandbox] programs (allowed: {', '.join(programs) or 'none'})"
    )
    if "/" in name:
        if not name.startswith("/"):
            raise SandboxError(f"program {name!r} must be a name looked up on PATH or an absolute path")
        allowed = {p for p in programs if p.startswith("/")}
        allowed |= {found for p in programs if "/" not in p and (found := shutil.which(p, path=SCRUBBED_PATH))}
        if name not in allowed:
            raise refused
        return name
    if name not in programs:
        raise refused
    found = shutil.which(name, path=SCRUBBED_PATH)
    if found is None:
        raise SandboxError(f"program {name!r} is allowed but not found on PATH {SCRUBBED_PATH}")
    return found


def _prepare_workspace(workspace: Path, cwd: str, user: tuple[int, int] | None) -> Path:
    """Check the workspace and ``cwd`` in it, make ``tmp/``, and give it all to the sandbox user.

    Only directories and singly-linked files change owner, never through a symlink: a
    previous run could have planted a link or a hard link to a file outside.
    """
    if not workspace.is_dir():
        raise SandboxError(f"workspace {workspace} is not a directory")
    relative = PurePosixPath(cwd)
    if relative.is_absolute() or ".." in relative.parts:
        raise SandboxError(f"cwd {cwd!r} must be a path relative to the workspace, without '..'")
    workdir = (workspace / relative).resolve()
    if not workdir.is_dir():
        raise SandboxError(f"cwd {cwd!r} is not a directory in the workspace")
    (workspace / "tmp").mkdir(exist_ok=True)
    if user is not None:
        uid, gid = user
        for top, dirs, files in os.walk(workspace):
            for entry in [top, *(os.path.join(top, name) for name in dirs + files)]:
                st = os.lstat(entry)
                owned = st.st_uid == uid and st.st_gid == gid
                if not owned and (stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1)):
                    os.chown(entry, uid, gid, follow_symlinks=False)
        why = unreachable(workspace)
        if why is not None:
            raise SandboxError(f"workspace {workspace} is not reachable by the sandbox user: {why}")
    return workdir


def _environment(workspace: Path, policy: SandboxPolicy) -> dict[str, str]:
    return {
        "PATH": SCRUBBED_PATH,
        "HOME": str(workspace),
        "LANG": "C.UTF-8",
        "TMPDIR": str(workspace / "tmp"),
        **policy.env,
    }


def _limiter(policy: SandboxPolicy) -> Callable[[], None]:
    """A preexec_fn setting the policy's rlimits in the child before it execs.

    Limits are clamped to the agent's own hard limits here, in the parent, so the child
    (which may no longer be root) does nothing but ``setrlimit``: code run between fork and
    exec must not take locks another thread of the agent might hold.
    """
    mb = 1024 * 1024
    wanted = [
        # The hard CPU limit a second later kills a program that catches SIGXCPU.
        (resource.RLIMIT_CPU, policy.cpu_s, policy.cpu_s + 1),
        (resource.RLIMIT_AS, policy.memory_mb * mb, policy.memory_mb * mb),
        (resource.RLIMIT_FSIZE, policy.file_mb * mb, policy.file_mb * mb),
        (resource.RLIMIT_NPROC, policy.nproc, policy.nproc),
        (resource.RLIMIT_NOFILE, policy.nofile, policy.nofile),
        # SIGXCPU's default action dumps core: not into the workspace.
        (resource.RLIMIT_CORE, 0, 0),
    ]
    limits = []
    for which, soft, hard in wanted:
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        limits.append((which, soft, hard))

    def apply() -> None:
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))

    return apply


class _Capture:
    """One output stream: the first ``cap`` bytes, whether there was more, and the last bytes
    (where a dying program says why)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.tail = b""
        self.truncated = False

    async def pump(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(_CHUNK):
            room = self.cap - len(self.data)
            if room > 0:
                self.data += chunk[:room]
            if len(chunk) > room:
                self.truncated = True
            self.tail = (self.tail + chunk)[-_TAIL_BYTES:]

    def text(self) -> str:
        return self.data.decode(errors="replace")


async def _feed(writer: asyncio.StreamWriter, data: bytes) -> None:
    try:
        writer.write(data)
        await writer.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program ended without reading all its input: not an error of the run
    finally:
        writer.close()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has already exited


async def run(
    argv: list[str],
    *,
    workspace: Path,
    policy: SandboxPolicy,
    timeout_s: float | None = None,
    stdin: bytes | None = None,
    cwd: str = ".",
    extra_programs: Sequence[str] = (),
) -> RunResult:
    """Run ``argv`` (never through a shell) in ``workspace`` under ``policy``.

    ``timeout_s`` (default ``policy.timeout_s``) is a wall-clock deadline for the whole
    process group. ``extra_programs`` are allowed for this call on top of the policy's list
    (the ``python`` skill's interpreter). A refusal raises :class:`SandboxError`; a program
    that fails or is stopped by a limit is a result (``exit_code``, ``killed``, ``reason``).
    Cancelling the call kills the program.

    The run is a ``shell.exec`` span: the program's name and argument count, its exit
    code, isolation and duration; never the arguments, which may carry data.
    """
    with tracer.start_as_current_span(
        "shell.exec",
        attributes={"process.executable.name": Path(argv[0]).name if argv else "", "process.args_count": len(argv)},
    ) as span:
        result = await _run(argv, workspace=workspace, policy=policy, timeout_s=timeout_s, stdin=stdin, cwd=cwd,
                            extra_programs=extra_programs)
        span.set_attributes({"process.exit.code": result.exit_code, "ledgerbus.sandbox.isolation": result.isolation})
        if result.killed or result.exit_code != 0:
            span.set_status(Status(StatusCode.ERROR, result.reason or f"exit code {result.exit_code}"))
        return result


async def _run(
    argv: list[str],
    *,
    workspace: Path,
    policy: SandboxPolicy,
    timeout_s: float | None,
    stdin: bytes | None,
    cwd: str,
    extra_programs: Sequence[str],
) -> RunResult:
    program = check_paths(argv, workspace, [*policy.programs, *extra_programs])
    level = await asyncio.to_thread(isolation, policy)
    user = sandbox_user()
    workspace = workspace.resolve()
    workdir = _prepare_workspace(workspace, cwd, user)
    env = _environment(workspace, policy)
    command = [program, *argv[1:]]
    if level == "bwrap":
        probe = probe_bwrap()
        assert probe.path is not None  # a usable probe found the binary
        binds = ["--bind", str(workspace), str(workspace), "--chdir", str(workdir), "--clearenv"]
        for key, value in env.items():
            binds += ["--setenv", key, value]
        command = [probe.path, *bwrap_options(probe.version), *binds, "--", *command]
    timeout = policy.timeout_s if timeout_s is None else timeout_s

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pipes = [os.fdopen(out_r, "rb", buffering=0), os.fdopen(err_r, "rb", buffering=0)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=out_w,
            stderr=err_w,
            cwd=workdir,
            env=env,
            start_new_session=True,
            preexec_fn=_limiter(policy),
            **run_as(user),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        for pipe in pipes:
            pipe.close()
        raise SandboxError(f"cannot start {argv[0]}: {getattr(exc, 'strerror', None) or exc}") from exc
    finally:
        # The parent's copies of the write ends: without closing them, reads never see EOF.
        os.close(out_w)
        os.close(err_w)

    out, err = _Capture(policy.output_bytes), _Capture(policy.output_bytes)
    transports: list[asyncio.ReadTransport] = []
    tasks: list[asyncio.Task[None]] = []
    timed_out = False
    try:
        for capture, pipe in zip((out, err), pipes, strict=True):
            reader = asyncio.StreamReader()
            transport, _ = await loop.connect_read_pipe(functools.partial(asyncio.StreamReaderProtocol, reader), pipe)
            transports.append(transport)
            tasks.append(asyncio.create_task(capture.pump(reader)))
        if stdin is not None and proc.stdin is not None:
            tasks.append(asyncio.create_task(_feed(proc.stdin, stdin)))
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
        # Whatever the program left running in its group ends with it.
        _kill_group(proc.pid)
        returncode = await proc.wait()
        duration = loop.time() - started
        _, pending = await asyncio.wait(tasks[:2], timeout=_DRAIN_S)
        if pending:
            log.warning("sandbox_output_still_open", argv=argv, isolation=level, why="a process left the group")
    finally:
        if proc.returncode is None:  # cancelled while the program ran
            _kill_group(proc.pid)
        for task in tasks:
            task.cancel()
        for transport in transports:
            transport.close()
        for pipe in pipes:  # also those no transport took (closing twice is harmless)
            pipe.close()

    signal_name = _signal_name(returncode, level)
    exit_code = 128 - returncode if returncode < 0 else returncode
    killed, reason = _classify(timed_out, timeout, signal_name, exit_code, err.tail, policy)
    return RunResult(
        argv=list(argv),
        exit_code=exit_code,
        signal=signal_name,
        stdout=out.text(),
        stderr=err.text(),
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        duration_s=round(duration, 3),
        isolation=level,
        killed=killed,
        reason=reason,
    )


def _signal_name(returncode: int, level: Isolation) -> str | None:
    """The signal that ended the program. bwrap reports a signal N as exit code 128 + N, as
    shells do, so under bwrap a program that itself exits 128 + N reads as killed by N."""
    if returncode < 0:
        number = -returncode
    elif level == "bwrap" and returncode > 128:
        number = returncode - 128
    else:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return None if returncode > 0 else f"signal {number}"


def _classify(
    timed_out: bool, timeout: float, signal_name: str | None, exit_code: int, tail: bytes, policy: SandboxPolicy
) -> tuple[Limit | None, str | None]:
    """Which limit stopped the program. Memory, file size (for programs that ignore
    SIGXFSZ, like Python) and process count show only in what the program said as it died."""
    said = tail.decode(errors="replace")
    if timed_out:
        return "deadline", f"killed after {round(timeout, 2):g}s deadline (process group)"
    if signal_name == "SIGXCPU":
        return "cpu", f"CPU time limit of {policy.cpu_s}s exceeded"
    if signal_name == "SIGXFSZ" or (exit_code and "File too large" in said):
        return "file_size", f"file size limit of {policy.file_mb} MB exceeded"
    if exit_code and any(mark in said for mark in _MEMORY_MARKS):
        return "memory", f"memory limit of {policy.memory_mb} MB exceeded"
    if exit_code and (
        any(mark in said for mark in _PROCESS_MARKS)
        or ("Resource temporarily unavailable" in said and "fork" in said.lower())
    ):
        return "processes", f"process limit of {policy.nproc} exceeded (a fork failed)"
    if signal_name == "SIGKILL":
        return "sigkill", (
            f"killed by SIGKILL from outside the program: the CPU hard limit of {policy.cpu_s + 1}s,"
            " or the kernel's out-of-memory killer"
        )
    return None, None
