"""The processes of a system a benchmark started: found by their working directory or
session, named by their Procfile role, their CPU time read from ``/proc``, and stopped (or
killed, and said so) when they will not go."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pids(predicate: Callable[[int], bool]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if predicate(int(entry.name)):
                    found.append(int(entry.name))
    return found


def cwd_under(directory: Path) -> Callable[[int], bool]:
    root = directory.resolve()

    def check(pid: int) -> bool:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        return cwd == root or root in cwd.parents

    return check


def in_session(sid: int) -> Callable[[int], bool]:
    def check(pid: int) -> bool:
        # Field 6 of /proc/PID/stat; the command name (field 2) may hold spaces, so count from ")".
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[3]) == sid

    return check


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    """What a process of the system is: its Procfile role as far as the command line says."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode(errors="replace") for a in argv if a]
    if any("nats-server" in w for w in words):
        return "nats-server"
    if any(w.endswith("honcho") for w in words):
        return "honcho"
    if "projections.writer" in " ".join(words) or any(w.endswith("writer.py") for w in words):
        return "projector writer"
    if "agentctl" in " ".join(words):
        rest = words[next(i for i, w in enumerate(words) if w.endswith("agentctl")) + 1:] if any(
            w.endswith("agentctl") for w in words) else words
        if rest and rest[0] == "agent" and "--name" in rest:
            return f"agent {rest[rest.index('--name') + 1]}"
        return " ".join(rest[:1]) or "agentctl"
    return Path(words[0]).name if words else str(pid)


def cpu_by_process(directory: Path) -> dict[int, tuple[str, float]]:
    """pid → (name, CPU seconds so far) for every process working under ``directory``."""
    found: dict[int, tuple[str, float]] = {}
    for pid in pids(cwd_under(directory)):
        with contextlib.suppress(OSError, ValueError):
            found[pid] = (process_name(pid), cpu_seconds(pid))
    return found


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              tasks: int) -> dict[str, float]:
    """CPU milliseconds per task by process name between two snapshots (replicas summed)."""
    spent: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent[name] = spent.get(name, 0.0) + (seconds - before.get(pid, (name, 0.0))[1]) * 1000 / tasks
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def reap(pids: list[int], what: str) -> list[str]:
    """Kill what outlived its supervisor (by pid: only processes this benchmark started) and
    say so; wait until they are gone."""
    notes = []
    for pid in pids:
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            notes.append(f"orphan of {what} left running, killed: pid {pid} {cmd[:80]}")
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILLed processes that are not our children: nothing to wait on
    return notes


def stop(proc: subprocess.Popen[Any], sig: signal.Signals, timeout: float, what: str) -> list[str]:
    """Signal ``proc``'s process group, wait for it, kill the group if it will not go."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
        return []
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return [f"{what} did not stop within {timeout:g} s of {sig.name}: killed"]


def tail(path: Path, lines: int = 25) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
