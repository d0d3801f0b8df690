"""``kill -USR1``: a running process logs what each of its tasks waits on (bus/stacks.py)."""

from __future__ import annotations

import asyncio
import json
import signal

from nats.aio.client import Client

from ledgerbus.bus import stacks
from ledgerbus.bus.settings import Settings
from tests.support import Procs, agentctl


async def _inner(gate: asyncio.Event) -> None:
    await gate.wait()


async def _outer(gate: asyncio.Event) -> None:
    await _inner(gate)


async def test_a_suspended_task_shows_each_coroutine_it_waits_in_innermost_last() -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_outer(gate), name="waiter")
    await asyncio.sleep(0)
    try:
        [found] = [t for t in stacks.tasks() if t["task"] == "waiter"]
        chain = found["awaits"]
        functions = [link.rsplit(" in ", 1)[-1] for link in chain if " in " in link]
        assert functions[:3] == ["_outer", "_inner", "wait"], chain
        assert chain[0].startswith(__file__.removesuffix("c")), chain
        assert chain[-1].startswith("awaits <Future pending"), chain
    finally:
        gate.set()
        await task
    assert "waiter" not in [t["task"] for t in stacks.tasks()], "a finished task is not listed"


async def test_sigusr1_makes_a_running_router_log_its_serving_loop_and_keep_serving(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    router = await procs.start("router", "router")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo")
    await router.wait_logged("router_started")
    router.proc.send_signal(signal.SIGUSR1)
    await router.wait_logged("tasks_dumped")

    [dump] = [line for line in router.log_lines() if line.get("event") == "tasks_dumped"]
    links = [link for task in dump["tasks"] for link in task["awaits"]]
    assert dump["count"] == len(dump["tasks"]) > 1
    assert any(link.endswith(" in _serve_batches") for link in links), links
    assert router.proc.returncode is None

    # The signal changed nothing: the router still serves.
    code, out, err = await agentctl(settings, "submit", "echo", "--input", '{"n": 1}', "--wait", "--json",
                                    timeout=60)
    assert code == 0 and json.loads(out)["output"] == {"n": 1}, err
    assert router.proc.returncode is None
