"""The short chaos run of the default suite: one seeded schedule with a router crash
between two of its steps, an agent killed mid-skill, a projector crash mid-batch and
nats-server killed and restarted, under a stream of tasks and plans. The full suite is
``pytest -m chaos tests/chaos`` (see tests/chaos/harness.py)."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.harness import chaos, schedule, seed_from_env

SHORT = ("router_crash", "agent_kill", "projector_crash", "server_kill")


async def test_a_short_schedule_of_faults_loses_and_doubles_nothing(tmp_path: Path, workspace_root: Path) -> None:
    seed = seed_from_env(default=1)
    await chaos(tmp_path, workspace_root, seed, schedule(seed, len(SHORT), SHORT))
