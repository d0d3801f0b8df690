"""The nats-server this project starts runs with half the cores for Go code (bus/server.py),
unless its caller said otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ledgerbus.bus.server import NatsServer, server_environ

HALF = str(max(1, len(os.sched_getaffinity(0)) // 2))


def test_the_server_gets_half_the_cores_unless_its_caller_chose() -> None:
    assert server_environ({"PATH": "/bin"}) == {"PATH": "/bin", "GOMAXPROCS": HALF}
    assert server_environ({"GOMAXPROCS": ""})["GOMAXPROCS"] == HALF  # set but empty: Go's default would apply
    assert server_environ({"GOMAXPROCS": "7"}) == {"GOMAXPROCS": "7"}


@pytest.mark.parametrize(("cores", "half"), [(8, "4"), (1, "1"), (None, "1")])
def test_without_an_affinity_call_the_machine_s_cores_are_counted(monkeypatch: pytest.MonkeyPatch,
                                                                   cores: int | None, half: str) -> None:
    # macOS has no os.sched_getaffinity: starting a server there must not fail on it.
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert server_environ({})["GOMAXPROCS"] == half


@pytest.mark.parametrize("given", [None, "3"])
async def test_a_started_server_runs_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             given: str | None) -> None:
    if given is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", given)
    async with NatsServer(tmp_path / "js") as server:
        assert server.proc is not None
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"GOMAXPROCS={given or HALF}".encode() in environ
