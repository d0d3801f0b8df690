"""Budgets: the usage report that takes a task over its budget fails the task; nothing
its claimant sends afterwards counts."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from ledgerbus.agents.runtime import Agent
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus.events import Budget, TaskCompleted, TaskSubmitted, TaskUsage, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.errors import SchemaMismatch
from ledgerbus.projections.projector import Projector
from tests.conftest import RunningRouter
from tests.support import agentctl, claim, send, wait_for_record, wait_for_records, wait_until

Connect = Callable[[str], Awaitable[Client]]


async def test_the_report_that_crosses_the_budget_fails_the_task(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    cli, agent = await connect_as("cli"), await connect_as("agent")
    steps = [
        ("cli", "a", TaskSubmitted(id=new_id(), task_id="t1", skill="echo", budget=Budget(tokens=100))),
        ("agent", "w1", claim(settings, "w1", "t1", "echo")),
        ("agent", "w1", TaskUsage(id=new_id(), task_id="t1", attempt=1, tokens_in=40, tokens_out=20)),
        ("agent", "w2", TaskUsage(id=new_id(), task_id="t1", attempt=1, tokens_in=500)),
        ("agent", "w1", TaskUsage(id=new_id(), task_id="t1", attempt=1, tokens_in=30, tokens_out=20)),
        ("agent", "w1", TaskCompleted(id=new_id(), task_id="t1", attempt=1, output="done anyway")),
        ("cli", "a", TaskSubmitted(id=new_id(), task_id="t2", skill="echo", budget=Budget(cost_usd=0.01))),
        ("agent", "w1", claim(settings, "w1", "t2", "echo")),
        ("agent", "w1", TaskUsage(id=new_id(), task_id="t2", attempt=1, cost_usd=0.02)),
        ("cli", "a", TaskSubmitted(id=new_id(), task_id="t3", skill="echo")),
        ("agent", "w1", claim(settings, "w1", "t3", "echo")),
        ("agent", "w1", TaskUsage(id=new_id(), task_id="t3", attempt=1, tokens_in=10**9)),
    ]
    for role, name, event in steps:
        await send(cli if role == "cli" else agent, role, name, event)
    records = await wait_for_records(admin.jetstream(), len(steps))
    assert [(r.key, r.verdict, r.code) for r in records] == [
        ("t1", "accepted", "ok"), ("t1", "accepted", "ok"), ("t1", "accepted", "ok"),
        ("t1", "rejected", "not_claimant"),
        ("t1", "accepted", "budget_exceeded"),
        ("t1", "rejected", "task_terminal"),
        ("t2", "accepted", "ok"), ("t2", "accepted", "ok"),
        ("t2", "accepted", "budget_exceeded"),
        ("t3", "accepted", "ok"), ("t3", "accepted", "ok"), ("t3", "accepted", "ok"),  # no budget, no limit
    ]
    assert records[4].reason == "110 tokens used of a budget of 100: the task fails"


class SpendSkill:
    """Reports two model calls of 8 tokens each, then finishes."""

    name = "spend"
    description = "spends tokens"

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        for _ in range(2):
            await ctx.usage(tokens_in=5, tokens_out=3, cost_usd=0.001, provider="test", model="m")
        return {"spent": 16}


async def test_a_skill_over_budget_fails_end_to_end(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    stop = asyncio.Event()
    agent = asyncio.create_task(Agent(await connect_as("agent"), settings, "spender", {"spend": SpendSkill()}).run(stop))
    try:
        await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_joined")
        code, out, err = await agentctl(settings, "submit", "spend", "--budget-tokens", "10", "--wait", "--json")
        assert code == 1, err
        view = json.loads(out)
        assert (view["status"], view["tokens"]) == ("failed", 16)
        assert view["error"] == "budget exceeded: 16 tokens used of a budget of 10: the task fails"
        code, out, _ = await agentctl(settings, "submit", "spend", "--budget-tokens", "100", "--wait", "--json")
        assert code == 0 and json.loads(out)["tokens"] == 16
    finally:
        stop.set()
        await agent


async def test_a_projection_file_of_an_older_schema_is_set_aside_and_rebuilt(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    await send(await connect_as("cli"), "cli", "a", TaskSubmitted(id=new_id(), task_id="t1", skill="echo"))
    await wait_for_records(admin.jetstream(), 1)
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:  # what schema v1 left behind
        conn.execute("CREATE TABLE tracking (name TEXT PRIMARY KEY, position INTEGER NOT NULL)")
        conn.execute("INSERT INTO tracking VALUES ('audit', 1)")
    with pytest.raises(SchemaMismatch, match=f"schema v0; this is v{dbmod.SCHEMA_VERSION}"):
        await dbmod.open_db(old)
    stop = asyncio.Event()
    projector = Projector(await connect_as("projector"), settings, old)
    running = asyncio.create_task(projector.run(stop))
    try:
        async def caught_up() -> bool:
            return projector.position >= 1

        await wait_until(caught_up, timeout=10, what="the rebuilt projection at seq 1")
    finally:
        stop.set()
        await running
    db = await dbmod.open_db(old)
    try:
        assert [row[0] for row in (await dbmod.dump(db))["tasks"]] == ["t1"]
    finally:
        await db.close()
    assert list(tmp_path.glob("old.db.old-*"))
