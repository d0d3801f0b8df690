"""Task workspaces: one directory per attempt, so attempts never trample each other."""

from __future__ import annotations

from pathlib import Path

from ledgerbus.agents import workspace


async def test_two_attempts_of_one_task_on_one_agent_never_share_a_workspace(tmp_path: Path) -> None:
    # A skill that outlives AckWait is redelivered, possibly to the same agent, while the
    # first attempt still runs: ending one attempt must leave the other's files alone.
    first = await workspace.make(tmp_path, "runner-1", "t1", 1, {"dep": {"x": 1}})
    second = await workspace.make(tmp_path, "runner-1", "t1", 2, {"dep": {"x": 2}})
    assert first != second
    workspace.release(first, failed=False, keep="none")
    assert not first.exists()
    assert (second / "context" / "dep.json").read_bytes() == b'{"x":2}'
    workspace.release(second, failed=True, keep="failed")  # kept for inspection
    assert second.is_dir()
    workspace.release(second, failed=False, keep="none")
    assert not (tmp_path / "runner-1" / "t1").exists()  # the last attempt takes the task's directory
