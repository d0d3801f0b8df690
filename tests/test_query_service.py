"""The query service: it answers while its projector is still catching up, and when one
projector of the queue group dies another goes on answering."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ledgerbus.bus import query, subjects
from ledgerbus.bus.errors import QueryError
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.projections.projector import Projector
from ledgerbus.projections.service import Progress
from tests.conftest import RunningRouter
from tests.support import Procs, agentctl, send, wait_for_records, wait_until

Connect = Callable[[str], Awaitable[Client]]


async def test_queries_are_answered_while_the_projector_catches_up(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    cli = await connect_as("cli")
    total = 2000
    for i in range(total):
        await send(cli, "cli", "ops", TaskSubmitted(id=new_id(), task_id=f"t{i}", skill="echo"))
    await wait_for_records(admin.jetstream(), total, timeout=60)

    projector = Projector(await connect_as("projector"), settings.replace(projector_batch=4))
    stop = asyncio.Event()
    running = asyncio.create_task(projector.run(stop))
    try:
        await asyncio.wait_for(projector.serving.wait(), 10)
        positions = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not positions or positions[-1] < total:
            try:
                msg = await admin.request(subjects.query("audit", "list"), b'{"limit": 1}', timeout=5)
            except nats.errors.NoRespondersError:
                # Seen about once in six runs, before this suite's orchestration work too: the
                # first request right after the projector subscribed and flushed found no
                # interest. Not explained yet (noted in the stop's closing note); the
                # service must answer within a second of saying it serves.
                assert not positions and loop.time() - started < 1.0, "the query service stopped answering"
                await asyncio.sleep(0.05)
                continue
            reply = json.loads(msg.data)
            assert reply["ok"], reply
            positions.append(reply["position"])
            # Position and data agree: the newest indexed record is the one at that position
            # (every record is indexed, the router's own signed checkpoints included).
            if reply["position"]:
                assert reply["data"][0]["seq"] == reply["position"]
        behind = [p for p in positions if 0 < p < total]
        assert behind, f"no answer came while catching up: {positions[:5]}..."
        assert positions == sorted(positions)
    finally:
        stop.set()
        await running


async def test_a_second_projector_in_the_group_takes_over_when_the_first_is_killed(
    procs: Procs, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    await procs.start("router", "router")
    first = await procs.start("projector-1", "projector", LEDGERBUS_DB_PATH=str(tmp_path / "one.db"))
    second = await procs.start("projector-2", "projector", LEDGERBUS_DB_PATH=str(tmp_path / "two.db"))
    for _ in range(3):
        code, _, err = await agentctl(settings, "submit", "echo")
        assert code == 0, err

    async def both_answered() -> bool:
        return await answered_by(admin) == 3

    await wait_until(both_answered, what="the projectors serving three tasks")
    first.kill9()
    await first.proc.wait()
    for _ in range(20):  # every one of these must be answered, by the survivor
        assert len(await query.ask(admin, "tasks", "list", {})) == 3
    second.kill9()
    await second.proc.wait()
    with pytest.raises(QueryError, match="no projector answers"):
        await query.ask(admin, "tasks", "list", {})


async def test_a_query_lost_with_a_dying_projector_is_asked_again(admin: Client, connect_as: Connect) -> None:
    """The request the server routed to a projector that was dying gets no answer; the
    second try reaches one that answers (here: one member that drops the first request)."""
    asked = []

    async def flaky(msg: Msg) -> None:
        asked.append(msg.data)
        if len(asked) % 2 == 0:
            await msg.respond(b'{"ok": true, "position": 7, "data": ["answered"]}')

    projector = await connect_as("projector")
    sub = await projector.subscribe(subjects.query("tasks", "list"), queue="projector", cb=flaky)
    try:
        await projector.flush()
        # The queue group's interest reaches the admin's account a moment after the flush
        # (across accounts, on a loaded machine): until then a request finds no responders
        # and never reaches `flaky`, so asking again changes nothing it counts.
        async with asyncio.timeout(5):
            while True:
                try:
                    # A timeout a loaded machine cannot miss for the try that is answered.
                    answer = await query.ask(admin, "tasks", "list", {"limit": 1}, timeout=2)
                    break
                except QueryError as exc:
                    if "no projector answers" not in str(exc):
                        raise
                    await asyncio.sleep(0.05)
        assert answer == ["answered"]
        assert len(asked) == 2 and asked[0] == asked[1]
        with pytest.raises(QueryError, match=r"did not answer q\.tasks\.list in 0\.5s \(1 tries\)"):
            await query.ask(admin, "tasks", "list", {}, timeout=0.5, tries=1)  # the third request: dropped
    finally:
        await sub.unsubscribe()


async def answered_by(admin: Client) -> int:
    try:
        return len(await query.ask(admin, "tasks", "list", {}))
    except QueryError:
        return 0


async def test_a_batch_committed_between_a_read_and_its_wait_is_not_missed() -> None:
    # A verdict query reads (nothing yet), then waits for the next batch. If the batch
    # commits in between, the wait must return at once, not after the whole timeout:
    # that lost wakeup once held every memory write for 10 s.
    progress = Progress()
    mark = progress.mark()  # taken before the read
    progress.advanced()     # the batch commits after the read, before the wait
    async with asyncio.timeout(1):
        await progress.wait(mark, 30)
