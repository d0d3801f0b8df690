"""The skill plugin API on a real bus: typed inputs and outputs, hooks, workspaces, and
``agentctl skills``. Agents run in the test's event loop with test skills."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
from nats.aio.client import Client

from ledgerbus.agents.hooks import DenyHook, DenyRule, Hooks, Veto
from ledgerbus.agents.runtime import Agent
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus.events import PlanStep, PlanSubmitted, TaskSubmitted, new_id
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import REPO, send, wait_for_record

Connect = Callable[[str], Awaitable[Client]]


class Point(msgspec.Struct, forbid_unknown_fields=True):
    x: int
    y: Annotated[int, msgspec.Meta(ge=0)] = 0


class Sum(msgspec.Struct):
    total: int


class TypedSkill:
    """Adds the point's coordinates; declares its input and output types. Returns a bad
    output when asked to (``x == 13``), and records what its workspace held."""

    name = "echo"
    description = "test: typed"
    input_type = Point
    output_type = Sum

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.workspaces: list[Path] = []
        self.context_files: dict[str, list[str]] = {}

    async def run(self, ctx: SkillContext, input: Point) -> Any:
        self.seen.append(input)
        self.workspaces.append(ctx.workspace)
        (ctx.output_dir() / "result.txt").write_text(str(input.x + input.y))
        self.context_files[ctx.step] = sorted(p.name for p in (ctx.workspace / "context").iterdir())
        if input.x == 13:
            return {"total": "thirteen"}
        if input.x == 99:
            raise RuntimeError("skill broke")
        return Sum(input.x + input.y)


class Doubler:
    """A plugin-style hook: doubles ``x`` on the way in when asked to, and marks the output."""

    name = "doubler"
    skills = ("ech*",)

    async def before(self, ctx: SkillContext, input: Any) -> Any:
        if not input.pop("double", False):
            return input
        return {**input, "x": input["x"] * 2}

    async def after(self, ctx: SkillContext, input: Any, output: Any) -> Any:
        return {**output, "hooked": True}


class Broken:
    """A hook that fails: the task must fail too, naming it."""

    name = "broken"

    async def before(self, ctx: SkillContext, input: Any) -> Any:
        if input.get("x") == 7:
            raise KeyError("boom")
        return input


@pytest.fixture
async def typed(running_router: RunningRouter, connect_as: Connect, settings: Settings
                ) -> AsyncIterator[TypedSkill]:
    stop = asyncio.Event()
    skill = TypedSkill()
    hooks = Hooks([DenyHook(DenyRule(match=r'"x":666', skills=["echo"], reason="not that number"), 0), Doubler(),
                   Broken()])
    agent = Agent(await connect_as("agent-echo-1"), settings, "echo-1", {"echo": skill}, concurrency=2, hooks=hooks)
    task = asyncio.create_task(agent.run(stop))
    yield skill
    stop.set()
    await task


async def result(admin: Client, task_id: str) -> AuditRecord:
    return await wait_for_record(
        admin.jetstream(),
        lambda r: r.key == task_id and (r.kind in ("task_completed", "task_failed") or not r.accepted), 20)


async def submit(connect_as: Connect, task_id: str, input: dict[str, Any]) -> None:
    await send(await connect_as("cli"), "cli", "alice",
               TaskSubmitted(id=new_id(), task_id=task_id, skill="echo", input=input))


async def test_the_agent_checks_the_input_type_before_the_skill_runs(
    typed: TypedSkill, connect_as: Connect, admin: Client
) -> None:
    await submit(connect_as, "bad", {"x": 1, "y": -5})
    end = await result(admin, "bad")
    assert end.kind == "task_failed"
    assert end.event.error == (  # type: ignore[union-attr]
        "input does not match echo's schema: expected int >= 0 - at `$.y`")
    assert typed.seen == [], "the skill never ran"


async def test_a_typed_skill_gets_its_struct_and_its_output_is_checked(
    typed: TypedSkill, connect_as: Connect, admin: Client
) -> None:
    await submit(connect_as, "good", {"x": 2, "y": 3, "double": True})
    end = await result(admin, "good")
    # The hook doubled x (2 → 4) before the skill saw it, and marked the output after.
    assert end.event.output == {"total": 7, "hooked": True}  # type: ignore[union-attr]
    assert typed.seen == [Point(4, 3)]

    await submit(connect_as, "badout", {"x": 13})
    end = await result(admin, "badout")
    assert end.kind == "task_failed"
    assert end.event.error.startswith(  # type: ignore[union-attr]
        "echo returned output that does not match its schema: expected int, got str - at `$.total`")


async def test_hooks_veto_and_a_broken_hook_fails_the_task_naming_it(
    typed: TypedSkill, connect_as: Connect, admin: Client
) -> None:
    await submit(connect_as, "vetoed", {"x": 666})
    end = await result(admin, "vetoed")
    assert (end.kind, end.event.error) == ("task_failed", "vetoed by hook policy.deny[1]: not that number")  # type: ignore[union-attr]
    await submit(connect_as, "hookfail", {"x": 7})
    end = await result(admin, "hookfail")
    assert end.event.error == "hook broken (before) failed: KeyError: 'boom'"  # type: ignore[union-attr]
    assert typed.seen == [], "neither task reached the skill"


async def test_a_task_gets_a_fresh_workspace_with_its_context_removed_after_it_completes(
    typed: TypedSkill, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    plan = PlanSubmitted(id=new_id(), task_id="ws", steps=[
        PlanStep(id="a", skill="echo", input={"x": 1}),
        PlanStep(id="b", skill="echo", input={"x": 2}),
        PlanStep(id="c", skill="echo", input={"x": 3}, deps=["a", "b"]),
    ])
    await send(await connect_as("cli"), "cli", "alice", plan)
    end = await result(admin, "ws")
    assert end.kind == "task_completed", end
    assert typed.context_files == {"a": [], "b": [], "c": ["a.json", "b.json"]}
    # <root>/<agent>/<task id>/<attempt>: each step's first attempt.
    assert {(p.parent.name, p.name) for p in typed.workspaces} == {("ws-a", "1"), ("ws-b", "1"), ("ws-c", "1")}
    assert all(p.parent.parent == settings.workspace_root / "echo-1" for p in typed.workspaces)
    assert not any(p.parent.exists() for p in typed.workspaces), "completed tasks leave no workspace behind"


async def test_a_failed_task_keeps_its_workspace_for_inspection(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    stop = asyncio.Event()
    skill = TypedSkill()
    agent = Agent(await connect_as("agent-echo-1"), settings, "echo-1", {"echo": skill})
    task = asyncio.create_task(agent.run(stop))
    try:
        await submit(connect_as, "kept", {"x": 99})
        end = await result(admin, "kept")
        assert (end.kind, end.event.error) == ("task_failed", "RuntimeError: skill broke")  # type: ignore[union-attr]
        kept = settings.workspace_root / "echo-1" / "kept" / "1"
        assert (kept / "output" / "result.txt").read_text() == "99"
    finally:
        stop.set()
        await task


async def test_veto_is_a_skill_error_with_the_reason() -> None:
    hook = DenyHook(DenyRule(match="rm -rf", reason="no"), 0)
    with pytest.raises(Veto, match="^no$"):
        await hook.before(None, {"argv": "rm -rf /"})  # type: ignore[arg-type]


async def test_agentctl_skills_lists_what_is_installed_with_schemas() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.agentctl", "skills", "--json", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    listed = {s["name"]: s for s in json.loads(out)["skills"]}
    assert {"echo", "sleep", "notes", "shell", "python", "llm.chat", "plan", "reason"} <= set(listed)
    sleep = listed["sleep"]
    assert sleep["input"]["$defs"]["SleepInput"]["properties"]["seconds"]["maximum"] == 86_400
    assert sleep["output"]["$defs"]["SleepOutput"]["required"] == ["slept"]
    assert listed["echo"]["input"] is None and "ledgerbus.plugins.echo:EchoSkill" in listed["echo"]["source"]

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.agentctl", "skills", "nope", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert "no installed skill named 'nope'" in err.decode()


async def test_an_agent_that_cannot_make_a_workspace_fails_the_task_clearly_and_stays_up(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    blocker = settings.workspace_root / "echo-1"
    blocker.write_text("a file where the agent's workspace directory should be")
    stop = asyncio.Event()
    skill = TypedSkill()
    agent = Agent(await connect_as("agent-echo-1"), settings, "echo-1", {"echo": skill})
    task = asyncio.create_task(agent.run(stop))
    try:
        await submit(connect_as, "nowhere", {"x": 1})
        end = await result(admin, "nowhere")
        assert end.kind == "task_failed"
        assert end.event.error.startswith("agent echo-1 cannot make the task's workspace: ")  # type: ignore[union-attr]
        assert skill.seen == []
        blocker.unlink()
        await submit(connect_as, "somewhere", {"x": 1})
        assert (await result(admin, "somewhere")).kind == "task_completed"
    finally:
        stop.set()
        await task
