"""Agent memory as events: writes, wipe, checkpoint and restore, caps, through a real router
and projector (in this process), read back through the query service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from nats.aio.client import Client

from ledgerbus.bus import query
from ledgerbus.bus.events import (
    CheckpointRestored,
    CheckpointSaved,
    Event,
    MemoryWiped,
    MemoryWritten,
    TaskSubmitted,
    new_id,
)
from ledgerbus.bus.settings import Settings
from ledgerbus.projections.projector import Projector
from tests.conftest import RunningRouter
from tests.support import claim, send, wait_until

Connect = Callable[[str], Awaitable[Client]]


@asynccontextmanager
async def projector_running(nc: Client, settings: Settings) -> AsyncIterator[Projector]:
    projector = Projector(nc, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        await asyncio.wait_for(projector.serving.wait(), 10)
        yield projector
    finally:
        stop.set()
        await task


class Writer:
    """Sends events as principals and waits until the projection holds each verdict."""

    def __init__(self, cli: Client, agent: Client, admin: Client) -> None:
        self.conns = {"cli": cli, "agent": agent}
        self.admin = admin

    async def __call__(self, role: str, name: str, event: Event) -> dict[str, Any]:
        await send(self.conns[role], role, name, event, msg_id=event.id)
        verdict: dict[str, Any] = await query.ask(
            self.admin, "audit", "verdict", {"msg_id": event.id, "wait_s": 10}, timeout=15
        )
        return verdict

    async def memory(self, agent: str) -> dict[str, Any]:
        mem: dict[str, Any] = await query.ask(self.admin, "memory", "get", {"agent": agent})
        return mem


def write(agent: str, section: str, value: Any, key: str | None = None, core: bool = False) -> MemoryWritten:
    return MemoryWritten(id=new_id(), agent=agent, section=section, key=key, value=value, core=core)  # type: ignore[arg-type]


def content(mem: dict[str, Any]) -> dict[str, Any]:
    """What a restore must reproduce: everything but the bookkeeping of the restore itself."""
    return {k: v for k, v in mem.items() if k not in ("updated_seq", "restored_from", "wiped_seq")}


async def test_wipe_keeps_role_and_core_knowledge_and_restore_brings_back_the_checkpoint(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    w = Writer(await connect_as("cli"), await connect_as("agent"), admin)
    async with projector_running(await connect_as("projector"), settings):
        await w("cli", "ops", write("a1", "role", "researcher"))
        await w("agent", "a1", write("a1", "knowledge", "Ada", key="user.name", core=True))
        await w("agent", "a1", write("a1", "knowledge", "curious", key="mood"))
        for i in range(3):
            await w("agent", "a1", write("a1", "observation", {"saw": i}))
        await w("agent", "a1", write("a1", "reasoning", "so: three things"))
        await w("cli", "ops", TaskSubmitted(id=new_id(), task_id="t1", skill="echo"))
        await w("agent", "a1", claim(settings, "a1", "t1", "echo"))
        saved = await w("agent", "a1", CheckpointSaved(id=new_id(), agent="a1", checkpoint_id="cp1", label="before",
                                                       state={"cursor": 7}))
        assert saved["verdict"] == "accepted"
        at_checkpoint = await w.memory("a1")
        assert at_checkpoint["current_task"] == "t1" and len(at_checkpoint["observations"]) == 3

        # More writes after the checkpoint, then restore it.
        await w("agent", "a1", write("a1", "observation", "later"))
        await w("agent", "a1", write("a1", "knowledge", None, key="user.name"))
        await w("agent", "a1", write("a1", "knowledge", "grumpy", key="mood"))
        await w("cli", "ops", write("a1", "role", "critic"))
        assert content(await w.memory("a1")) != content(at_checkpoint)
        restored = await w("cli", "ops", CheckpointRestored(id=new_id(), agent="a1", checkpoint_id="cp1"))
        assert restored["verdict"] == "accepted"
        after = await w.memory("a1")
        assert content(after) == content(at_checkpoint)
        assert after["restored_from"] == "cp1"

        # Wipe: only the role and the core knowledge stay.
        await w("cli", "ops", MemoryWiped(id=new_id(), agent="a1", reason="new project"))
        wiped = await w.memory("a1")
        assert wiped["role"] == "researcher"
        assert wiped["knowledge"] == {"user.name": {"value": "Ada", "core": True, "seq": at_checkpoint["knowledge"]
                                                    ["user.name"]["seq"]}}
        assert (wiped["observations"], wiped["reasoning"], wiped["current_task"]) == ([], [], None)

        # The checkpoint catalogue counts the restore; a second checkpoint id is refused if reused.
        [cp] = await query.ask(admin, "checkpoints", "list", {"agent": "a1"})
        assert (cp["checkpoint_id"], cp["label"], cp["state"], cp["restores"]) == ("cp1", "before", {"cursor": 7}, 1)
        again = await w("agent", "a1", CheckpointSaved(id=new_id(), agent="a1", checkpoint_id="cp1"))
        assert (again["verdict"], again["code"]) == ("rejected", "duplicate_checkpoint")


async def test_memory_lists_roll_their_oldest_entries_into_one_summary(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    settings = settings.replace(memory_list_cap=4)
    router = RunningRouter(await connect_as("router"), settings)
    await router.start()
    w = Writer(await connect_as("cli"), await connect_as("agent"), admin)
    try:
        async with projector_running(await connect_as("projector"), settings):
            for i in range(11):
                await w("agent", "a1", write("a1", "observation", f"o{i}", ))
            mem = await w.memory("a1")
    finally:
        await router.stop()
    observations = mem["observations"]
    assert len(observations) <= 4
    [summary] = [e for e in observations if e.get("summary")]
    plain = [e["value"] for e in observations if not e.get("summary")]
    assert summary["rolled"] + len(plain) == 11
    assert plain == [f"o{i}" for i in range(11 - len(plain), 11)]  # the newest, in order
    assert observations[0] is summary and summary["first_seq"] < summary["seq"]


async def test_an_agent_cannot_touch_another_agents_memory_and_the_refusal_is_audited(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    w = Writer(await connect_as("cli"), await connect_as("agent"), admin)
    async with projector_running(await connect_as("projector"), settings):
        refused = await w("agent", "b1", MemoryWiped(id=new_id(), agent="a1"))
        assert (refused["verdict"], refused["code"]) == ("rejected", "not_memory_owner")
        assert "own memory" in refused["reason"]
        unknown = await w("agent", "a1", CheckpointRestored(id=new_id(), agent="a1", checkpoint_id="never"))
        assert unknown["code"] == "unknown_checkpoint"
        assert (await w.memory("a1"))["updated_seq"] is None  # nothing was written

        async def both_rejections_indexed() -> bool:
            rows = await query.ask(admin, "audit", "list", {"key": "a1"})
            return {r["code"] for r in rows} == {"not_memory_owner", "unknown_checkpoint"}

        await wait_until(both_rejections_indexed, what="the rejections in the audit index")
