"""How an agent pulls work for several skills with fewer slots than skills: every skill's
long poll is out at once (a task does not wait for another skill's idle poll to end), and
the agent never runs more tasks at once than its concurrency.

The long poll is made 5 s here and a task must finish well inside it: what is tested is
which event ends the wait, not the machine's speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats.js.errors
import pytest
import structlog.testing
from nats.aio.client import Client

from ledgerbus.agents import intake
from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.runtime import Agent
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus import subjects
from ledgerbus.bus.acks import LaterAcks
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.pull import Puller
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import LostAcks, audit_records, send, wait_for_record, wait_until

Connect = Callable[[str], Awaitable[Client]]
POLL = 5.0


class Counted:
    """Sleeps ``input["seconds"]``; counts how many of its kind run at once."""

    claim_first = False
    uses_workspace = False

    def __init__(self, name: str, running: list[int]) -> None:
        self.name = name
        self.description = f"test skill {name}"
        self.running = running

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        self.running[0] += 1
        self.running[1] = max(self.running[1], self.running[0])
        try:
            await asyncio.sleep(input.get("seconds", 0))
        finally:
            self.running[0] -= 1
        return input


@pytest.fixture
async def one_slot(running_router: RunningRouter, connect_as: Connect, settings: Settings,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[int]]:
    """An agent with two skills and one slot; yields [running now, most at once]."""
    monkeypatch.setattr(intake, "POLL_S", POLL)
    running = [0, 0]
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), settings, "runner-1",
                  {"shell": Counted("shell", running), "python": Counted("python", running)}, concurrency=1)
    task = asyncio.create_task(agent.run(stop))
    await wait_for_record((await connect_as("admin")).jetstream(), lambda r: r.kind == "agent_joined")
    await asyncio.sleep(0.5)  # every poll is out
    yield running
    stop.set()
    await task


def ended(task_id: str) -> Callable[[AuditRecord], bool]:
    return lambda r: r.key == task_id and r.kind in ("task_completed", "task_failed")


def submitted(task_id: str) -> Callable[[AuditRecord], bool]:
    return lambda r: r.key == task_id and r.kind == "task_submitted"


async def submit(cli: Client, task_id: str, skill: str, seconds: float = 0) -> None:
    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id=task_id, skill=skill,
                                                  input={"seconds": seconds}))


async def test_a_task_does_not_wait_for_another_skills_idle_poll(one_slot: list[int], connect_as: Connect,
                                                                admin: Client) -> None:
    cli = await connect_as("cli")
    # The same skill twice in a row, then the other: when a poll held the only slot, the
    # second task of a skill waited for the other skill's poll to expire.
    for i, skill in enumerate(["shell", "shell", "shell", "python", "python", "shell"]):
        started = time.monotonic()
        await submit(cli, f"t{i}", skill)
        done = await wait_for_record(admin.jetstream(), ended(f"t{i}"), timeout=3 * POLL)
        assert done.accepted and done.kind == "task_completed"
        assert time.monotonic() - started < POLL / 2, f"task {i} ({skill}) waited for a poll to expire"


async def test_never_more_tasks_at_once_than_slots(one_slot: list[int], connect_as: Connect, admin: Client) -> None:
    cli = await connect_as("cli")
    await submit(cli, "a", "shell", seconds=1.0)
    await submit(cli, "b", "python", seconds=0.2)  # its poll brings it while "a" holds the slot
    for task_id in ("a", "b"):
        done = await wait_for_record(admin.jetstream(), ended(task_id), timeout=3 * POLL)
        assert done.accepted and done.kind == "task_completed"
    assert one_slot == [0, 1]


async def test_a_task_running_past_ack_wait_is_kept_alive_and_delivered_once(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client) -> None:
    # AckWait 0.6 s, the skill 2 s: without the keep-alive the item would come back (and be
    # run again, as attempt 2) three times over.
    short = settings.replace(work_ack_wait_s=0.6)
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), short, "runner-1", {"shell": Counted("shell", [0, 0])},
                  concurrency=2)
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_joined")
        await submit(await connect_as("cli"), "long", "shell", seconds=2.0)
        done = await wait_for_record(admin.jetstream(), ended("long"), timeout=10)
        assert done.accepted and done.kind == "task_completed"
        assert done.event is not None and done.event.attempt == 1  # type: ignore[union-attr]

        async def acked() -> bool:  # a moment after the report: bus/acks.py
            info = await admin.jetstream().consumer_info(subjects.WORK_STREAM, subjects.work_consumer("shell"))
            return info.num_ack_pending == 0

        await wait_until(acked, timeout=5, what="the item acked")
        info = await admin.jetstream().consumer_info(subjects.WORK_STREAM, subjects.work_consumer("shell"))
        assert info.num_redelivered == 0
    finally:
        stop.set()
        await task


class Failing(Counted):
    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        raise SkillError("it fails")


async def test_a_completed_task_logs_task_finished_at_debug_and_a_failed_one_at_info(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client) -> None:
    # At hundreds of tasks a second one info line per completion was the whole console
    # (and honcho's CPU); failures stay visible at the default level.
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), settings, "runner-1",
                  {"shell": Counted("shell", [0, 0]), "python": Failing("python", [0, 0])}, concurrency=2)
    with structlog.testing.capture_logs() as logged:
        task = asyncio.create_task(agent.run(stop))
        try:
            await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_joined")
            cli = await connect_as("cli")
            for task_id, skill in (("ok", "shell"), ("bad", "python")):
                await submit(cli, task_id, skill)
                await wait_for_record(admin.jetstream(), ended(task_id), timeout=10)
        finally:
            stop.set()
            await task
    finished = {line["task_id"]: line for line in logged if line["event"] == "task_finished"}
    assert finished["ok"]["log_level"] == "debug" and finished["ok"]["outcome"] == "task_completed"
    assert finished["bad"]["log_level"] == "info" and finished["bad"]["outcome"] == "task_failed"


async def test_a_stop_ends_the_idle_polls_at_once(running_router: RunningRouter, connect_as: Connect,
                                                  settings: Settings, admin: Client,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every skill's poll is out for POLL (5 s here); draining does not wait for them."""
    monkeypatch.setattr(intake, "POLL_S", POLL)
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), settings, "runner-1",
                  {"shell": Counted("shell", [0, 0]), "python": Counted("python", [0, 0])}, concurrency=1)
    task = asyncio.create_task(agent.run(stop))
    await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_joined")
    await asyncio.sleep(0.5)  # every poll is out
    started = time.monotonic()
    stop.set()
    await task
    assert time.monotonic() - started < POLL / 2, "the agent waited out its polls"
    left = await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_left")
    assert left.accepted


async def test_a_stop_with_every_slot_busy_gives_the_running_tasks_drain_timeout_and_no_more(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client) -> None:
    """The polls wait for a free slot while the one slot runs a long task. A stop must not
    wait for that slot first: the running task gets ``drain_timeout_s`` (1 s here), and is
    then cancelled and handed back (the next agent claims it at once, not after AckWait),
    not run to its end (30 s)."""
    quick = settings.replace(drain_timeout_s=1.0, work_ack_wait_s=30.0)

    def agent(running: list[int]) -> Agent:
        return Agent(nc, quick, "runner-1", {"shell": Counted("shell", running), "python": Counted("python", [0, 0])},
                     concurrency=1)

    nc = await connect_as("agent-runner-1")
    stop, running = asyncio.Event(), [0, 0]
    task = asyncio.create_task(agent(running).run(stop))
    await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_joined")
    await submit(await connect_as("cli"), "long", "shell", seconds=30)
    async with asyncio.timeout(10):
        while running[0] == 0:
            await asyncio.sleep(0.05)
    started = time.monotonic()
    stop.set()
    await task
    assert time.monotonic() - started < 6, "the stop waited for the running task's slot before its drain timeout"
    assert running[0] == 0, "the long task was not cancelled"
    assert (await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_left")).accepted
    stop, running = asyncio.Event(), [0, 0]
    task = asyncio.create_task(agent(running).run(stop))
    try:
        again = await wait_for_record(admin.jetstream(), lambda r: r.key == "long" and r.kind == "task_started"
                                      and r.accepted and r.event.attempt == 2, timeout=10)  # type: ignore[union-attr]
        assert again.accepted
    finally:
        stop.set()
        await task


async def test_a_batch_request_follows_an_item_only_when_more_were_queued_behind_it(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After an item, the agent asks for as many more as it has free slots, and the server
    answers that request at once from what is queued, or after ``BATCH_WAIT_S`` with
    nothing. A lone task's delivery says nothing is queued behind it: no request then."""
    requests: list[tuple[int, float]] = []
    pull = Puller.pull

    async def counted(self: Puller, batch: int, wait: float) -> list[Any]:
        requests.append((batch, wait))
        return await pull(self, batch, wait)

    monkeypatch.setattr(Puller, "pull", counted)
    cli = await connect_as("cli")
    for i in range(3):  # queued before the agent runs: the first delivery has two behind it
        await submit(cli, f"queued{i}", "shell")
    for task_id in ("queued0", "queued1", "queued2"):
        await wait_for_record(admin.jetstream(), submitted(task_id))
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), settings, "runner-1",
                  {"shell": Counted("shell", [0, 0]), "python": Counted("python", [0, 0])}, concurrency=9)
    task = asyncio.create_task(agent.run(stop))  # 9 slots: 3 for each skill's queue and the assigned one
    try:
        for i in range(3):
            assert (await wait_for_record(admin.jetstream(), ended(f"queued{i}"))).kind == "task_completed"
        assert any(wait == intake.BATCH_WAIT_S for _, wait in requests), requests
        for i in range(3):
            del requests[:]
            await submit(cli, f"lone{i}", "shell")
            assert (await wait_for_record(admin.jetstream(), ended(f"lone{i}"))).kind == "task_completed"
            await asyncio.sleep(2 * intake.BATCH_WAIT_S)
            assert [r for r in requests if r[1] == intake.BATCH_WAIT_S] == [], requests
            assert (1, intake.POLL_S) in requests, "the agent went back to its long poll"
    finally:
        stop.set()
        await task


class Timed(Counted):
    """A :class:`Counted` that notes when each run starts and ends, by its input's ``tag``."""

    def __init__(self, name: str, events: list[tuple[str, str, float]]) -> None:
        super().__init__(name, [0, 0])
        self.events = events

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        self.events.append(("start", input["tag"], time.monotonic()))
        try:
            return await super().run(ctx, input)
        finally:
            self.events.append(("end", input["tag"], time.monotonic()))


async def test_after_a_lone_item_the_next_poll_waits_for_it_to_end_but_not_for_a_long_one(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone item's next long poll is requested once the item has ended: sent at once,
    it woke the server on the task's path. A longer item has the poll out again after
    ``LONE_ITEM_S``, so a task arriving meanwhile starts beside it."""
    monkeypatch.setattr(intake, "POLL_S", POLL)
    events: list[tuple[str, str, float]] = []
    pull = Puller.pull

    async def noted(self: Puller, batch: int, wait: float) -> list[Any]:
        if ".WORK." in self._next:  # not the router's pulls, in this process too
            events.append(("poll", "", time.monotonic()))
        return await pull(self, batch, wait)

    monkeypatch.setattr(Puller, "pull", noted)
    cli = await connect_as("cli")
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), settings, "runner-1", {"shell": Timed("shell", events)},
                  concurrency=4)
    task = asyncio.create_task(agent.run(stop))

    async def run_alone(task_id: str, seconds: float) -> None:
        await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id=task_id, skill="shell",
                                                      input={"seconds": seconds, "tag": task_id}))

    try:
        await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_joined")
        await asyncio.sleep(0.5)  # the poll is out
        for i in range(3):
            del events[:]
            await run_alone(f"quick{i}", 0)
            assert (await wait_for_record(admin.jetstream(), ended(f"quick{i}"))).kind == "task_completed"
            await asyncio.sleep(0.2)
            kinds = [kind for kind, _, _ in events]
            assert kinds[:3] == ["start", "end", "poll"], events

        del events[:]
        await run_alone("slow", 2.0)

        async def noted_any(kind: str, tag: str | None = None) -> bool:
            return any(e[0] == kind and tag in (None, e[1]) for e in events)

        await wait_until(lambda: noted_any("start", "slow"), timeout=10)
        started = next(at for kind, tag, at in events if (kind, tag) == ("start", "slow"))
        await wait_until(lambda: noted_any("poll"), timeout=1)
        polled = next(at for kind, _, at in events if kind == "poll")
        assert polled - started < 1.0, "the next poll waited for the long item"
        await run_alone("beside", 0)
        assert (await wait_for_record(admin.jetstream(), ended("beside"))).kind == "task_completed"
        assert not any(e[:2] == ("end", "slow") for e in events), "the second task waited for the first"
        assert (await wait_for_record(admin.jetstream(), ended("slow"))).kind == "task_completed"
    finally:
        stop.set()
        await task


async def test_a_lone_item_is_acked_a_moment_after_its_report_and_a_stop_sends_the_ack_due(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client) -> None:
    """An item that came alone is acked ``ACK_LATER_S`` after its report is stored
    (bus/acks.py says why), not at once; a stop sends what is due before the agent leaves."""
    cli = await connect_as("cli")
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), settings, "runner-1", {"shell": Counted("shell", [0, 0])},
                  concurrency=2)
    agent.later_acks.delay = 1.0  # long enough to see, where 20 ms is not
    js = admin.jetstream()

    async def work_held() -> int:
        return (await js.stream_info(subjects.WORK_STREAM)).state.messages

    async def acked() -> bool:
        return await work_held() == 0

    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for_record(js, lambda r: r.kind == "agent_joined")
        await submit(cli, "lone", "shell")
        assert (await wait_for_record(js, ended("lone"))).kind == "task_completed"
        assert await work_held() == 1, "acked at once"
        await wait_until(acked, timeout=10, what="the lone item acked")
        await submit(cli, "last", "shell")
        assert (await wait_for_record(js, ended("last"))).kind == "task_completed"
    finally:
        stop.set()
        await task
    assert await work_held() == 0, "the stop left the last ack unsent: a redelivery for another replica"


async def test_a_completed_item_whose_late_ack_never_went_out_is_redelivered_and_recorded_once(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client) -> None:
    """The window the late ack widens (docs/architecture.md, what happens when a process
    dies): the item comes back after AckWait, its task has ended, and the skill that claims
    with its result runs again, its report refused. One result is recorded; WORK drains."""
    short = settings.replace(work_ack_wait_s=0.6)
    stop = asyncio.Event()
    running = [0, 0]
    agent = Agent(await connect_as("agent-runner-1"), short, "runner-1", {"shell": Counted("shell", running)},
                  concurrency=2)
    js = admin.jetstream()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for_record(js, lambda r: r.kind == "agent_joined")
        agent.later_acks = lost = LostAcks()  # as if the agent died before sending the ack
        await submit(await connect_as("cli"), "once", "shell")
        first = await wait_for_record(js, ended("once"))
        assert first.accepted and first.kind == "task_completed"

        async def held() -> bool:
            return bool(lost.held)

        await wait_until(held, timeout=5, what="the first run's ack handed over")
        agent.later_acks = LaterAcks()  # the redelivered item's ack goes out

        again = await wait_for_record(js, lambda r: r.key == "once" and r.kind == "task_completed"
                                      and not r.accepted, timeout=10)
        assert again.event is not None and again.event.attempt == 2  # type: ignore[union-attr]

        async def drained() -> bool:
            return (await js.stream_info(subjects.WORK_STREAM)).state.messages == 0

        await wait_until(drained, timeout=10, what="the redelivered item acked")
        records = await audit_records(js)
        assert [r.seq for r in records if r.key == "once" and r.kind == "task_completed" and r.accepted] == [first.seq]
    finally:
        stop.set()
        await task


async def test_a_heartbeat_that_outlives_a_cancel_does_not_write_the_key_again_after_the_agent_left(
        running_router: RunningRouter, connect_as: Connect, settings: Settings, admin: Client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py waits for a put's reply with ``wait_for``, which on Python 3.11 can drop a
    cancel that lands with the reply (CPython gh-86296): the beat goes on. A stopping agent
    must have ended it before it deletes its key, or the key comes back after it left."""
    beat = Agent._heartbeat

    async def loses_one_cancel(self: Agent, kv: Any) -> None:
        try:
            await beat(self, kv)
        except asyncio.CancelledError:
            await beat(self, kv)  # as if the cancel had been dropped

    monkeypatch.setattr(Agent, "_heartbeat", loses_one_cancel)
    quick = settings.replace(heartbeat_interval_s=0.2)
    stop = asyncio.Event()
    agent = Agent(await connect_as("agent-runner-1"), quick, "runner-1", {"shell": Counted("shell", [0, 0])})
    task = asyncio.create_task(agent.run(stop))
    await wait_for_record(admin.jetstream(), lambda r: r.kind == "agent_joined")
    kv = await admin.jetstream().key_value(subjects.AGENTS_BUCKET)
    assert (await kv.get(agent.kv_key)).value
    stop.set()
    await task
    await asyncio.sleep(5 * quick.heartbeat_interval_s)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(agent.kv_key)
