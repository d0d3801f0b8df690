"""The sandboxed skills through the bus: an agent process serving ``shell`` and ``python``
stops what breaks the rules with a clear error (one ``task_failed`` record each) and stays
up to run the next task. tests/test_sandbox.py covers each limit in detail."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client

from ledgerbus.bus.settings import Settings
from tests.support import Procs, agentctl, audit_records
from tests.test_e2e import start_system

POLICY = """
[sandbox]
programs = ["echo", "cat", "sleep"]
cpu_s = 1
timeout_s = 5
"""


async def submit(settings: Settings, skill: str, input: dict[str, Any]) -> tuple[int, dict]:
    code, out, err = await agentctl(settings, "submit", skill, "--input", json.dumps(input), "--wait", "--json")
    assert out, err
    return code, json.loads(out)


async def test_the_agent_stops_bad_commands_clearly_and_stays_up(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    settings.policy_path.write_text(POLICY)
    await start_system(procs, admin, ("runner-1", "shell,python"))

    code, task = await submit(settings, "shell", {"argv": ["rm", "-rf", "/"]})
    assert (code, task["status"]) == (1, "failed")
    assert "program 'rm' is not allowed by policy [sandbox] programs" in task["error"]

    code, task = await submit(settings, "shell", {"argv": ["cat", "../../etc/passwd"]})
    assert "'../../etc/passwd'" in task["error"] and task["status"] == "failed"

    code, task = await submit(settings, "python", {"code": "while True: pass"})
    assert task["status"] == "failed" and "CPU time limit of 1s exceeded" in task["error"]

    code, task = await submit(settings, "shell", {"argv": ["sleep", "30"], "timeout_s": 1})
    assert task["status"] == "failed" and "deadline" in task["error"]

    # Still up: the next command runs, in the task's workspace.
    code, task = await submit(settings, "shell", {"argv": ["echo", "still", "here"]})
    assert code == 0, task
    assert task["output"]["stdout"] == "still here\n" and task["output"]["exit_code"] == 0
    records = await audit_records(admin.jetstream())
    failures = [r for r in records if r.kind == "task_failed"]
    assert len(failures) == 4, "each refusal is one audited failure"
    assert sum(r.kind == "agent_left" for r in records) == 0, "the agent never went down"
