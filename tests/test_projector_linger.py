"""The projector's linger (``LEDGERBUS_PROJECTOR_LINGER_S``): while records come fast, a
trickle is folded and committed together, not one commit each; a record after a quiet
moment is not held; a full batch does not wait.

Against a real server and a real router. The lingers here are long (seconds) and the
records come well inside them, so what is tested is which records share a batch, not how
fast the machine is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from ledgerbus.bus import subjects
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.projections.projector import Flow, Projector, next_batch
from tests.conftest import RunningRouter
from tests.support import send, wait_for_records

Connect = Callable[[str], Awaitable[Client]]
LINGER = 1.0


async def positions_while_trickling(connect_as: Connect, admin: Client, settings: Settings,
                                    busy: bool) -> list[int]:
    """The projector's positions, seen every 5 ms, while three submissions come 100 ms apart,
    its linger a second; ``busy``: as if records had been coming fast until then."""
    js = admin.jetstream()
    projector = Projector(await connect_as("projector"), settings.replace(projector_linger_s=LINGER))
    stop = asyncio.Event()
    running = asyncio.create_task(projector.run(stop))
    try:
        await asyncio.wait_for(projector.serving.wait(), 10)
        start = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
        async with asyncio.timeout(30):
            while projector.position < start:
                await asyncio.sleep(0.005)
        seen = [projector.position]

        async def watch() -> None:
            while True:
                if projector.position != seen[-1]:
                    seen.append(projector.position)
                await asyncio.sleep(0.005)

        watching = asyncio.create_task(watch())
        if busy:
            # A count of 10,000 decays below the busy mark in 1.4 s (TAU_S 0.2):
            # long past the trickle, however slow the machine.
            projector.flow.took(10_000)
        cli = await connect_as("cli")
        for i in range(3):
            await send(cli, "cli", "ops", TaskSubmitted(id=new_id(), task_id=f"trickle{busy}-{i}", skill="echo"))
            await asyncio.sleep(0.1)
        await wait_for_records(js, start + 3)
        async with asyncio.timeout(30):
            while projector.position < start + 3:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        watching.cancel()
        return seen
    finally:
        stop.set()
        await running


async def test_records_that_trickle_in_are_committed_together(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    lingering = await positions_while_trickling(connect_as, admin, settings, busy=True)
    assert len(lingering) == 2, f"each record was committed by itself: positions {lingering}"
    # After a quiet moment the same trickle is committed record by record (each record comes
    # alone, and nothing came fast before it): nothing is held that there is nothing to join.
    quiet = await positions_while_trickling(connect_as, admin, settings, busy=False)
    assert len(quiet) == 4, f"a record after a quiet moment waited for others: positions {quiet}"


async def test_a_full_batch_does_not_linger(admin: Client) -> None:
    js = admin.jetstream()
    await js.add_stream(name="LINGERTEST", subjects=["q.lingertest.>"])
    sub = await js.subscribe("q.lingertest.>", stream="LINGERTEST", ordered_consumer=True)
    for i in range(5):
        await js.publish("q.lingertest.x", str(i).encode())  # q.> is a subject admin may publish to
    async with asyncio.timeout(10):
        while sub.pending_msgs < 5:
            await asyncio.sleep(0.01)
    flow = Flow()
    flow.took(10_000)
    started = time.monotonic()
    batch = await next_batch(sub, 4, wait=5.0, linger=30.0, flow=flow)
    assert [m.data for m in batch] == [b"0", b"1", b"2", b"3"]
    assert time.monotonic() - started < 10.0, "a full batch waited out the linger"
    # One left, fewer than a batch, records coming fast: it waits the linger for others,
    # and takes one that came meanwhile.
    waiting = asyncio.create_task(next_batch(sub, 4, wait=5.0, linger=LINGER, flow=flow))
    await asyncio.sleep(LINGER / 4)
    await js.publish("q.lingertest.x", b"5")
    assert [m.data for m in await waiting] == [b"4", b"5"]
    # Once the flow has died down, a lone record is handed over without a linger.
    quiet = Flow()
    waiting = asyncio.create_task(next_batch(sub, 4, wait=5.0, linger=30.0, flow=quiet))
    await js.publish("q.lingertest.x", b"6")
    started = time.monotonic()
    assert [m.data for m in await waiting] == [b"6"]
    assert time.monotonic() - started < 10.0, "a record after a quiet moment waited out the linger"
    assert not quiet.busy


def test_the_flow_is_busy_while_records_come_fast_and_not_after() -> None:
    flow = Flow()
    assert not flow.busy
    flow.took(int(Flow.BUSY_PER_S * Flow.TAU_S) + 1)
    assert flow.busy
    flow._at -= 5 * Flow.TAU_S  # five time constants later: under 1% of the count is left
    assert not flow.busy

