"""Reading the log from the CLI: a bounded read returns every record, every time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.follow import records
from tests.conftest import RunningRouter
from tests.support import wait_for_records


async def test_a_bounded_read_returns_the_whole_log_however_fast_the_server_pushes(
    running_router: RunningRouter, connect_as: Callable[[str], Awaitable[Client]], admin: Client
) -> None:
    cli = await connect_as("cli")
    for i in range(5):
        event = TaskSubmitted(id=new_id(), task_id=f"t{i}", skill="echo")
        await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(event))
    await wait_for_records(admin.jetstream(), 5)
    js = cli.jetstream()
    # The server may have pushed everything before the reader asks what is pending;
    # repeating the read makes that interleaving likely.
    for _ in range(20):
        assert [r.seq async for r, _ in records(js)] == [1, 2, 3, 4, 5]
    assert [r.key async for r, _ in records(js, subjects.audit_for_key("t3"))] == ["t3"]
    assert [r.seq async for r, _ in records(js, from_seq=4)] == [4, 5]
    assert [r async for r in records(js, subjects.audit_for_key("nothing"))] == []
