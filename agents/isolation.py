"""What confinement this machine offers a sandboxed command: whether bubblewrap works
here, which unprivileged user commands run as when the agent is root, whether that user
can reach a directory, and the description ``agentctl doctor`` prints.

:mod:`agents.sandbox` runs commands at the level :func:`isolation` picks.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, Literal

import msgspec

from ledgerbus.agents.errors import SkillError
from ledgerbus.bus.agent_policy import SandboxPolicy

Isolation = Literal["bwrap", "rlimits"]

SCRUBBED_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The only PATH a sandboxed program sees, and the one programs are looked up on."""

NOBODY = 65534
"""The conventional uid and gid of ``nobody``, used when the user database has no entry."""

_BWRAP_DISABLE_USERNS_SINCE = (0, 8)


class SandboxError(SkillError):
    """A command was refused or could not be run; the message says which rule or what failed."""


class BwrapProbe(msgspec.Struct, frozen=True, kw_only=True):
    """Whether bubblewrap can make a sandbox on this machine, and if not, why."""

    path: str | None
    version: str
    """``bwrap --version`` as printed; empty when it could not be asked."""
    usable: bool
    reason: str


def sandbox_user() -> tuple[int, int] | None:
    """The (uid, gid) sandboxed programs run as: ``nobody`` when the agent is root, else None
    (the agent's own user)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return NOBODY, NOBODY
    return entry.pw_uid, entry.pw_gid


def run_as(user: tuple[int, int] | None) -> dict[str, Any]:
    """Subprocess arguments that start the child as ``user`` with no supplementary groups
    (root's groups would otherwise come along)."""
    return {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}


def unreachable(path: Path, *, execute: bool = False) -> str | None:
    """Why the sandbox user cannot reach ``path`` (search every directory on the way, read it,
    and with ``execute`` run it), or None if it can. Judged from permission bits (no ACLs)."""
    user = sandbox_user()
    real = Path(os.path.realpath(path))
    if user is None:
        mode = os.R_OK | (os.X_OK if execute else 0)
        return None if os.access(real, mode) else f"{real} is not accessible to uid {os.geteuid()}"
    uid, gid = user
    who = f"the sandbox user (uid {uid})"
    for directory in reversed(real.parents):
        try:
            st = directory.stat()
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        if not _permits(st, uid, gid, stat.S_IXOTH):
            return f"{who} cannot enter {directory} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})"
    try:
        st = real.stat()
    except OSError as exc:
        return f"{real}: {exc.strerror}"
    needed = stat.S_IROTH | (stat.S_IXOTH if execute else 0)
    if not _permits(st, uid, gid, needed):
        return f"{who} cannot {'run' if execute else 'read'} {real} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _permits(st: os.stat_result, uid: int, gid: int, other_bits: int) -> bool:
    """Whether uid/gid has the ``other`` bits given, in the class of the file that applies to it."""
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid == gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & other_bits == other_bits


@functools.cache
def probe_bwrap() -> BwrapProbe:
    """Find bubblewrap and try it once per process: containers often forbid the user
    namespaces it needs, and only running it tells. Blocks for the probe (tens of ms)."""
    path = shutil.which("bwrap", path=SCRUBBED_PATH)
    if path is None:
        return BwrapProbe(path=None, version="", usable=False, reason=f"bwrap is not installed (PATH {SCRUBBED_PATH})")
    try:
        asked = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=10)
        version = asked.stdout.strip()
        argv = [path, *bwrap_options(version), "--clearenv", "--setenv", "PATH", SCRUBBED_PATH, "--", "true"]
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=10, cwd="/", **run_as(sandbox_user())
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return BwrapProbe(path=path, version="", usable=False, reason=f"bwrap {path} could not be run: {exc}")
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return BwrapProbe(
            path=path, version=version, usable=False, reason=f"bwrap {path} cannot create a sandbox here: {said[0]}"
        )
    return BwrapProbe(path=path, version=version, usable=True, reason="bwrap works here")


def bwrap_options(version: str) -> list[str]:
    """The confinement every bwrap run gets; ``--disable-userns`` (bubblewrap 0.8+) also keeps
    the program from making namespaces of its own, a common kernel attack surface."""
    options = [
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        "--unshare-all", "--die-with-parent", "--new-session",
    ]  # fmt: skip
    found = re.search(r"(\d+)\.(\d+)", version)
    if found and (int(found[1]), int(found[2])) >= _BWRAP_DISABLE_USERNS_SINCE:
        options += ["--unshare-user", "--disable-userns"]
    return options


def isolation(policy: SandboxPolicy) -> Isolation:
    """The level a run gets under ``policy``: ``auto`` is bwrap where it works, else rlimits.

    Raises :class:`SandboxError` when the policy demands bwrap and it does not work here.
    """
    if policy.isolation == "rlimits":
        return "rlimits"
    probe = probe_bwrap()
    if probe.usable:
        return "bwrap"
    if policy.isolation == "bwrap":
        raise SandboxError(f'policy [sandbox] isolation = "bwrap", but {probe.reason}')
    return "rlimits"


def describe(policy: SandboxPolicy) -> dict[str, Any]:
    """What the sandbox enforces on this machine under ``policy``, for ``agentctl doctor``."""
    probe = probe_bwrap()
    try:
        level: Isolation | None = isolation(policy)
        problem = None
    except SandboxError as exc:
        level, problem = None, str(exc)
    user = sandbox_user()
    enforced = [
        "programs allowlist and path checks on arguments",
        f"scrubbed environment (PATH={SCRUBBED_PATH}, HOME and TMPDIR in the workspace)",
        "rlimits: CPU time, address space, file size, open files, processes of the user",
        "the deadline kills the process group; so does the program's exit",
    ]
    if level == "bwrap":
        enforced += [
            "read-only filesystem except the workspace and a private /tmp",
            "no network; private pid, ipc and uts namespaces: everything dies with the run",
        ]
    else:
        enforced += [
            "writes and network limited only by the running user's permissions",
            "a process that leaves its process group (setsid, setpgid) outlives the run",
        ]
    return {
        "isolation": level,
        "requested": policy.isolation,
        "error": problem,
        "bwrap": {"path": probe.path, "version": probe.version, "usable": probe.usable, "reason": probe.reason},
        "user": "the agent's own" if user is None else f"uid {user[0]} gid {user[1]} (the agent runs as root)",
        "limits": {
            "cpu_s": policy.cpu_s,
            "memory_mb": policy.memory_mb,
            "file_mb": policy.file_mb,
            "nproc": policy.nproc,
            "nofile": policy.nofile,
            "output_bytes": policy.output_bytes,
            "timeout_s": policy.timeout_s,
        },
        "programs": list(policy.programs),
        "enforced": enforced,
    }
