"""The router bench's floor (``python -m bench --only router``): the router with only the
subject and schema checks must still do all the rest of a router's work per message, or
its distance from the relay would not be what the other checks cannot win back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from bench.__main__ import FLOOR_CHECKS
from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.router.app import Router
from ledgerbus.router.checks import principal, schema
from tests.support import send, wait_for_records, wait_until, work_count

Connect = Callable[[str], Awaitable[Client]]


def test_the_floor_keeps_the_checks_every_record_needs() -> None:
    assert FLOOR_CHECKS == [principal.check, schema.check]


async def test_the_floor_router_audits_seals_and_dispatches_as_the_shipped_one_does(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    router = Router(await connect_as("router"), settings, FLOOR_CHECKS)
    await router.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(router.run(stop))
    cli, js = await connect_as("cli"), admin.jetstream()
    try:
        for i in range(3):  # as the bench preloads them
            await send(cli, "cli", "bench", TaskSubmitted(id=new_id(), task_id=f"t{i}", skill="echo",
                                                          input={"i": i, "text": "hello"}))
        records = await wait_for_records(js, 3)
        assert [(r.kind, r.verdict, r.code, r.principal, r.key) for r in records] == [
            ("task_submitted", "accepted", "ok", "cli-bench", f"t{i}") for i in range(3)]
        assert [r.prev_hash for r in records[1:]] == [r.hash for r in records[:-1]]  # one chain

        async def dispatched() -> bool:
            return await work_count(js) == 3

        await wait_until(dispatched, what="three work items")
        sub = await js.pull_subscribe(subjects.WORK_ALL, stream=subjects.WORK_STREAM)
        items = [codec.decode_work(msg.data) for msg in await sub.fetch(3, timeout=5)]
        assert sorted(item.task_id for item in items) == ["t0", "t1", "t2"]
        assert all(item.token for item in items)  # each with its claim token
    finally:
        stop.set()
        await serving
        await cli.close()
