"""The third-party skill example (examples/skill-package) installs with pip and runs
through the bus: an agent finds it by its entry point, the router dispatches to it, its
hook and its input type work as documented."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.bus.settings import Settings
from tests.support import REPO, Procs, agentctl, wait_for_record
from tests.test_e2e import joined


@pytest.fixture
async def site(tmp_path: Path) -> Path:
    """The example installed with pip into a directory of its own (not this environment)."""
    source = tmp_path / "skill-package"
    shutil.copytree(REPO / "examples" / "skill-package", source)
    target = tmp_path / "site"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
        str(target), str(source), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return target


async def test_the_example_skill_package_installs_and_runs_through_the_bus(
    site: Path, procs: Procs, admin: Client, settings: Settings
) -> None:
    env = {"PYTHONPATH": str(site)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.agentctl", "skills", "wordcount", "--json", env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    listed = json.loads(out)
    assert listed["source"] == "ledgerbus_wordcount:WordCountSkill (ledgerbus-wordcount 0.1.0)"
    assert listed["input"]["$defs"]["Text"]["required"] == ["text"]

    await procs.start("router", "router")
    await procs.start("counter-1", "agent", "--name", "counter-1", "--skills", "wordcount", **env)
    await wait_for_record(admin.jetstream(), joined("counter-1"))

    async def submit(payload: dict) -> tuple[int, dict]:
        code, out, err = await agentctl(settings, "submit", "wordcount", "--input", json.dumps(payload), "--wait",
                                        "--json")
        assert out, err
        return code, json.loads(out)

    code, task = await submit({"text": "  The cat and the hat. The end.  ", "top": 2})
    assert code == 0, task
    assert task["output"] == {"words": 7, "distinct": 5, "top": [["the", 3], ["cat", 1]]}
    # Only the agent knows the skill's type: it refuses a bad input before the skill runs.
    code, task = await submit({"text": 5})
    assert (code, task["status"]) == (1, "failed")
    assert task["error"] == "input does not match wordcount's schema: expected str, got int - at `$.text`"
    # The package's hook vetoes an empty text.
    code, task = await submit({"text": "   "})
    assert task["error"] == "vetoed by hook wordcount-trim: there is nothing to count"
    # A failed task keeps its workspace; a completed one leaves nothing behind.
    assert (settings.workspace_root / "counter-1" / task["task_id"]).is_dir()
