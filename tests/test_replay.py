"""Replay and time travel: a rebuild at --until-seq N or --until T equals the live tables as
they were when N was the head; at the head it equals the live tables now."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.client import Client

from ledgerbus.bus.events import TaskCompleted, TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.projector import Projector
from tests.conftest import RunningRouter
from tests.support import agentctl, claim, send, wait_for_records, wait_until

Connect = Callable[[str], Awaitable[Client]]


async def live_dump_at(settings: Settings, projector: Projector, seq: int) -> dict:
    async def caught_up() -> bool:
        return projector.position >= seq

    await wait_until(caught_up, what=f"projector at seq {seq}")
    db = await dbmod.open_db(settings.db_path)
    try:
        return await dbmod.dump(db)
    finally:
        await db.close()


async def replayed(settings: Settings, path: Path, *args: str) -> dict:
    code, out, err = await agentctl(settings, "replay", "--db", str(path), "--json", *args)
    assert code == 0, err
    db = await dbmod.open_db(path)
    try:
        return {"report": json.loads(out), "dump": await dbmod.dump(db)}
    finally:
        await db.close()


async def test_replay_until_a_sequence_or_a_time_equals_the_live_state_back_then(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    cli, agent = await connect_as("cli"), await connect_as("agent")
    stop = asyncio.Event()
    projector = Projector(await connect_as("projector"), settings)
    running = asyncio.create_task(projector.run(stop))
    try:
        for t in ("a", "b"):
            await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id=t, skill="echo", input={"t": t}))
        await send(agent, "agent", "w1", claim(settings, "w1", "a", "echo"))
        then = await wait_for_records(admin.jetstream(), 3)
        head_then, moment = then[-1].seq, then[-1].at
        live_then = await live_dump_at(settings, projector, head_then)

        await send(agent, "agent", "w1", TaskCompleted(id=new_id(), task_id="a", attempt=1, output=1))
        await send(cli, "cli", "bob", TaskSubmitted(id=new_id(), task_id="c", skill="echo"))
        now = await wait_for_records(admin.jetstream(), 5)
        live_now = await live_dump_at(settings, projector, now[-1].seq)
        assert live_now != live_then

        by_seq = await replayed(settings, tmp_path / "by-seq.db", "--until-seq", str(head_then))
        assert by_seq["dump"] == live_then and by_seq["report"]["position"] == head_then
        by_time = await replayed(settings, tmp_path / "by-time.db", "--until", moment.isoformat())
        assert by_time["dump"] == live_then
        at_head = await replayed(settings, tmp_path / "now.db")
        assert at_head["dump"] == live_now
        assert at_head["report"]["rows"]["tasks"] == 3
    finally:
        stop.set()
        await running

    code, _, err = await agentctl(settings, "replay", "--db", str(tmp_path / "now.db"))
    assert code == 2 and "exists" in err
    code, _, err = await agentctl(settings, "replay", "--db", str(tmp_path / "x.db"), "--until", "yesterday")
    assert code == 2 and "ISO 8601" in err
