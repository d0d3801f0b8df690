"""The router against a real nats-server: one audit record per message, whatever its fate;
nothing rejected reaches WORK; the chain recomputes and survives restarts and crashes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
import pytest
import structlog.testing
from nats.aio.client import Client

from ledgerbus.bus import chain, codec, subjects
from ledgerbus.bus.events import TaskCompleted, TaskStarted, TaskSubmitted, kind_of, new_id
from ledgerbus.bus.provision import router_consumer_config
from ledgerbus.bus.settings import Settings
from ledgerbus.router.app import Router
from ledgerbus.router.checks import Inbound, Rejection, default_checks
from ledgerbus.router.lease import Lease
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState
from tests.conftest import RunningRouter
from tests.support import LostAcks, audit_records, claim, stored_audit, wait_for_records, wait_until, work_count

CLI = subjects.principal("cli", "alice")
AGENT = subjects.principal("agent", "worker-1")
OTHER_AGENT = subjects.principal("agent", "worker-2")

Connect = Callable[[str], Awaitable[Client]]


async def send(nc: Client, who: subjects.Principal, event: object, kind: str | None = None) -> None:
    """Publish an event to INGRESS as ``who`` and wait for the PubAck."""
    kind = kind or kind_of(type(event))  # type: ignore[arg-type]
    await nc.jetstream().publish(subjects.ingress(who, kind), codec.encode(event))


def submitted(task_id: str, skill: str = "echo") -> TaskSubmitted:
    return TaskSubmitted(id=new_id(), task_id=task_id, skill=skill, input={"text": task_id})


async def test_valid_submission_yields_one_accepted_record_and_one_work_message(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    await send(cli, CLI, submitted("t1"))
    [record] = await wait_for_records(admin.jetstream(), 1)
    assert (record.verdict, record.code, record.kind, record.key, record.principal) == (
        "accepted", "ok", "task_submitted", "t1", "cli-alice")
    assert await work_count(admin.jetstream()) == 1
    msg = await admin.jetstream().get_msg(subjects.WORK_STREAM, seq=1)
    assert msg.data is not None
    item = codec.decode_work(msg.data)
    assert (item.task_id, item.skill, item.input, item.audit_seq) == ("t1", "echo", {"text": "t1"}, 1)


@pytest.mark.parametrize(
    ("kind", "body", "code", "reason_has"),
    [
        ("task_submitted", b"\xff\xfe not json", "schema", "not valid JSON"),
        ("task_submitted", b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","timeout_s":"1"}',
         "schema", "$.timeout_s"),
        ("task_exploded", b'{"kind":"task_exploded","id":"m"}', "schema", "task_exploded"),
        ("task_started", codec.encode(TaskSubmitted(id="m", task_id="t", skill="echo")), "kind_mismatch", "body"),
        ("task_submitted", b"", "empty", "empty"),
        ("task_submitted", b"{" * (300 * 1024), "too_large", "limit"),
    ],
)
async def test_bad_input_yields_one_rejected_record_and_nothing_in_work(
    running_router: RunningRouter, connect_as: Connect, admin: Client, kind: str, body: bytes, code: str,
    reason_has: str,
) -> None:
    cli = await connect_as("cli")
    await cli.jetstream().publish(f"in.cli.alice.{kind}", body)
    # A valid message after the bad one proves the router is still serving.
    await send(cli, CLI, submitted("after"))
    bad, good = await wait_for_records(admin.jetstream(), 2)
    assert (bad.verdict, bad.code, bad.principal) == ("rejected", code, "cli-alice")
    assert reason_has.lower() in bad.reason.lower()
    assert bad.event is None or bad.code == "kind_mismatch"
    if bad.event is None:
        assert bad.raw is not None and bad.raw.size == len(body)
    assert good.accepted and good.key == "after"
    assert await work_count(admin.jetstream()) == 1


async def test_only_the_claimant_may_report_and_a_task_completes_once(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    cli, agent = await connect_as("cli"), await connect_as("agent")
    await send(cli, CLI, submitted("t1"))
    await send(cli, CLI, submitted("t1"))  # the same task id again
    await send(agent, AGENT, TaskCompleted(id=new_id(), task_id="t1", attempt=1, output=1))  # never claimed
    await send(agent, AGENT, claim(settings, "worker-1", "t1", "echo"))
    await send(agent, OTHER_AGENT, TaskCompleted(id=new_id(), task_id="t1", attempt=1, output=2))
    await send(agent, AGENT, TaskCompleted(id=new_id(), task_id="t1", attempt=1, output=3))
    await send(agent, OTHER_AGENT, claim(settings, "worker-2", "t1", "echo", attempt=2))  # too late
    await send(agent, AGENT, TaskStarted(id=new_id(), task_id="nope", attempt=1))
    records = await wait_for_records(admin.jetstream(), 8)
    assert [(r.kind, r.code) for r in records] == [
        ("task_submitted", "ok"),
        ("task_submitted", "duplicate_task"),
        ("task_completed", "not_claimant"),
        ("task_started", "ok"),
        ("task_completed", "not_claimant"),
        ("task_completed", "ok"),
        ("task_started", "task_terminal"),
        ("task_started", "unknown_task"),
    ]
    assert await work_count(admin.jetstream()) == 1


async def test_a_cli_may_not_send_agent_events(running_router: RunningRouter, connect_as: Connect,
                                               admin: Client) -> None:
    cli = await connect_as("cli")
    await send(cli, CLI, submitted("t1"))
    await cli.jetstream().publish("in.cli.alice.task_started",
                                  codec.encode(TaskStarted(id=new_id(), task_id="t1", attempt=1)))
    _, record = await wait_for_records(admin.jetstream(), 2)
    assert (record.verdict, record.code) == ("rejected", "kind_not_allowed")


async def test_the_hash_chain_of_many_records_recomputes(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    for i in range(60):
        if i % 7 == 3:
            await cli.jetstream().publish("in.cli.alice.task_submitted", b"garbage %d" % i)
        else:
            await send(cli, CLI, submitted(f"t{i}"))
    await wait_for_records(admin.jetstream(), 60)
    stored = await stored_audit(admin.jetstream())
    assert [seq for seq, _ in stored] == list(range(1, 61))
    head = chain.verify(stored)
    assert head.seq == 60
    assert head.hash == codec.decode_record(stored[-1][1]).hash


async def test_a_restarted_router_continues_the_chain_without_a_gap(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    for i in range(10):
        await send(cli, CLI, submitted(f"a{i}"))
    await wait_for_records(admin.jetstream(), 10)
    await running_router.stop()
    for i in range(10):  # these wait in INGRESS while no router runs
        await send(cli, CLI, submitted(f"b{i}"))
    await send(cli, CLI, submitted("a3"))  # a duplicate only the recovered state can catch
    await running_router.start()
    records = await wait_for_records(admin.jetstream(), 21)
    assert chain.verify(await stored_audit(admin.jetstream())).seq == 21
    assert [r.code for r in records].count("ok") == 20
    assert records[-1].code == "duplicate_task"
    assert await work_count(admin.jetstream()) == 20


async def test_a_stop_ends_the_idle_fetch_at_once_and_the_next_router_takes_what_comes_after(
    connect_as: Connect, admin: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle router waits on a fetch (at most 1 s; 20 s here, so the difference shows).
    A stop ends it at once. The request it leaves open on the server takes nothing once the
    router lets go (what it brought in before is handed back: tests/test_pull.py), so a
    message sent then is audited by the next router at once, not after AckWait (30 s)."""
    monkeypatch.setattr(Router, "_idle_wait", lambda self: 20.0)
    slow = settings.replace(ingress_ack_wait_s=30.0)
    rr = RunningRouter(await connect_as("router"), slow)
    await rr.start()
    cli = await connect_as("cli")
    await send(cli, CLI, submitted("before"))
    await wait_for_records(admin.jetstream(), 1)
    await asyncio.sleep(0.3)  # the router's next fetch is waiting
    loop = asyncio.get_running_loop()
    started = loop.time()
    await rr.stop()
    assert loop.time() - started < 10, "the stop waited out the fetch"
    await send(cli, CLI, submitted("meanwhile"))
    await rr.start()
    records = await wait_for_records(admin.jetstream(), 2, timeout=5)
    assert [r.key for r in records] == ["before", "meanwhile"]
    await rr.stop()


async def test_a_lost_lease_ends_the_idle_fetch_at_once_and_the_leader_after_takes_what_comes_after(
    connect_as: Connect, admin: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader whose lease is taken over (as after a pause past its TTL) steps down at its
    next renewal, however long its fetch waits (20 s here); and the request it leaves open
    takes nothing, so the next leader audits a message sent meanwhile at once, not after
    AckWait (30 s)."""
    monkeypatch.setattr(Router, "_idle_wait", lambda self: 20.0)
    nc = await connect_as("router")
    router = Router(nc, settings.replace(ingress_ack_wait_s=30.0), lease=Lease(nc.jetstream(), 1.5, "first"))
    stop = asyncio.Event()
    cli = await connect_as("cli")
    with structlog.testing.capture_logs() as logged:
        serving = asyncio.create_task(router.run(stop))
        try:
            await send(cli, CLI, submitted("before"))
            await wait_for_records(admin.jetstream(), 1)
            await asyncio.sleep(0.3)  # the leader's next fetch is waiting
            lease = await Lease((await connect_as("router")).jetstream(), 1.5, "second").bucket()
            await lease.put(subjects.ROUTER_LEADER_KEY, b"second")
            loop = asyncio.get_running_loop()
            taken = loop.time()

            async def stepped_down() -> bool:
                return any(line["event"] == "stepped_down" for line in logged)

            await wait_until(stepped_down, 10, what="the leader stepping down")
            assert loop.time() - taken < 5, "the leader waited out its fetch before stepping down"
            await send(cli, CLI, submitted("meanwhile"))
            await lease.delete(subjects.ROUTER_LEADER_KEY)  # the other one lets go: the first leads again
            records = await wait_for_records(admin.jetstream(), 2, timeout=5)
            assert [r.key for r in records] == ["before", "meanwhile"]
        finally:
            stop.set()
            await serving


async def test_a_crash_between_audit_and_ack_never_audits_a_message_twice(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    cli = await connect_as("cli")
    for i in range(5):
        await send(cli, CLI, submitted(f"t{i}"))
    # The first router appends the audit records and "crashes" before dispatching or acking.
    crashed = Router(await connect_as("router"), settings)
    await crashed.start()
    sub = await crashed.js.pull_subscribe(subjects.INGRESS_ALL, durable=subjects.ROUTER_CONSUMER,
                                          stream=subjects.INGRESS_STREAM, config=router_consumer_config(settings))
    msgs = await sub.fetch(5, timeout=5)
    await crashed.audit_batch(msgs)
    await crashed.nc.close()
    assert len(await audit_records(admin.jetstream())) == 5
    assert await work_count(admin.jetstream()) == 0
    # The next router gets the same messages again (after AckWait) and only dispatches them.
    replacement = RunningRouter(await connect_as("router"), settings)
    await replacement.start()
    js = admin.jetstream()

    async def settled() -> bool:
        return (await js.stream_info(subjects.INGRESS_STREAM)).state.messages == 0

    try:
        await wait_until(settled, what="INGRESS acked")
    finally:
        await replacement.stop()
    records = await audit_records(js)
    assert [r.key for r in records] == [f"t{i}" for i in range(5)]
    assert await work_count(js) == 5


async def ingress_unacked(js: Any) -> int:
    """INGRESS messages the router has not acked (delivered or not)."""
    return (await js.stream_info(subjects.INGRESS_STREAM)).state.messages


async def all_acked(js: Any, what: str, timeout: float = 10) -> None:
    """Wait until the router has acked every INGRESS message."""
    async def acked() -> bool:
        return await ingress_unacked(js) == 0

    await wait_until(acked, timeout=timeout, what=what)


async def test_a_lone_message_is_acked_a_moment_after_it_is_settled_and_a_stop_sends_the_ack_due(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    """A message that came alone is acked ``ACK_LATER_S`` after its record is stored and its
    work dispatched (bus/acks.py says why); a stop sends what is due at once."""
    router = running_router.router
    assert router is not None
    router.later_acks.delay = 1.0  # long enough to see, where 20 ms is not
    js = admin.jetstream()
    cli = await connect_as("cli")
    await send(cli, CLI, submitted("lone"))
    await wait_for_records(js, 1)
    assert await work_count(js) == 1
    assert await ingress_unacked(js) == 1, "acked at once"
    await all_acked(js, "the lone message acked")
    await send(cli, CLI, submitted("stopped"))
    await wait_for_records(js, 2)
    await running_router.stop()
    assert await ingress_unacked(js) == 0, "the stop left the last ack unsent: a redelivery for the next router"


async def test_a_lone_message_whose_late_ack_never_went_out_is_dispatched_once_and_audited_once(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    """The window the late ack widens (docs/architecture.md, what happens when a process
    dies): the message comes back to the next router, which finds its record and
    re-dispatches it; WORK de-duplicates the item, nothing is audited twice."""
    short = settings.replace(ingress_ack_wait_s=1.0)
    first = RunningRouter(await connect_as("router"), short)
    router = await first.start()
    router.later_acks = LostAcks()
    js = admin.jetstream()
    await send(await connect_as("cli"), CLI, submitted("lone"))
    await wait_for_records(js, 1)
    assert await work_count(js) == 1
    await first.stop()
    assert await ingress_unacked(js) == 1, "the ack went out after all"

    replacement = RunningRouter(await connect_as("router"), short)
    await replacement.start()
    try:
        await all_acked(js, "the redelivered message settled", timeout=15)
    finally:
        await replacement.stop()
    assert [r.key for r in await audit_records(js)] == ["lone"]
    assert await work_count(js) == 1


async def test_a_batch_of_messages_is_acked_at_once(connect_as: Connect, admin: Client, settings: Settings) -> None:
    cli = await connect_as("cli")
    for i in range(5):  # queued before the router starts: one batch
        await send(cli, CLI, submitted(f"t{i}"))
    running = RunningRouter(await connect_as("router"), settings)
    router = await running.start()
    router.later_acks.delay = 60.0
    js = admin.jetstream()
    try:
        await all_acked(js, "the batch acked")
    finally:
        await running.stop()
    assert await work_count(js) == 5


@pytest.mark.parametrize("role", ["cli", "agent", "projector"])
async def test_no_principal_but_the_router_may_write_audit_or_work(
    running_router: RunningRouter, connect_as: Connect, admin: Client, role: str
) -> None:
    nc = await connect_as(role)
    for subject in ("audit.accepted.task_submitted.t1", "work.echo"):
        with pytest.raises(nats.errors.Error):
            # A refused publish gets no PubAck: it times out, and the server logs the violation.
            await nc.jetstream().publish(subject, b"{}", timeout=0.5)
    assert (await admin.jetstream().stream_info(subjects.AUDIT_STREAM)).state.messages == 0
    assert await work_count(admin.jetstream()) == 0


async def test_an_agent_cannot_publish_as_a_cli(running_router: RunningRouter, connect_as: Connect) -> None:
    agent = await connect_as("agent")
    with pytest.raises(nats.errors.Error):
        await agent.jetstream().publish(subjects.ingress(CLI, "task_submitted"),
                                        codec.encode(submitted("t1")), timeout=0.5)


async def test_client_control_headers_are_rejected_or_refused(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    body = codec.encode(submitted("t1"))
    # A Nats-* header JetStream passes through reaches the router, which rejects it.
    await cli.jetstream().publish("in.cli.alice.task_submitted", body, headers={"Nats-Marker": "1"})
    # JetStream itself refuses a rollup on INGRESS: the publish fails and nothing is logged.
    with pytest.raises(nats.js.errors.APIError):
        await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(submitted("t2")),
                                      headers={"Nats-Rollup": "sub"})
    await send(cli, CLI, submitted("t3"))
    bad, good = await wait_for_records(admin.jetstream(), 2)
    assert (bad.code, bad.key) == ("forbidden_header", "t1")
    assert "Nats-Marker" in bad.reason
    assert good.accepted and good.key == "t3"
    assert await work_count(admin.jetstream()) == 1


async def test_a_reused_message_id_is_rejected_beyond_the_jetstream_window(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    first = submitted("t1")
    await send(cli, CLI, first)
    # Same event id, different content, and a Nats-Msg-Id JetStream has not seen: exactly
    # what arrives once the window has passed.
    replay = TaskSubmitted(id=first.id, task_id="t2", skill="echo")
    await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(replay),
                                  headers={subjects.HDR_MSG_ID: "another"})
    ok, dup = await wait_for_records(admin.jetstream(), 2)
    assert ok.accepted
    assert (dup.code, dup.key) == ("duplicate_message", "t2")
    assert "seq 1" in dup.reason
    assert await work_count(admin.jetstream()) == 1


async def test_a_restarted_router_still_knows_the_message_ids_it_accepted(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    cli = await connect_as("cli")
    first = submitted("t1")
    await send(cli, CLI, first)
    await wait_for_records(admin.jetstream(), 1)
    await running_router.stop()
    await running_router.start()
    await cli.jetstream().publish("in.cli.alice.task_submitted",
                                  codec.encode(TaskSubmitted(id=first.id, task_id="t2", skill="echo")))
    _, dup = await wait_for_records(admin.jetstream(), 2)
    assert dup.code == "duplicate_message"


async def test_the_ids_remembered_beyond_the_window_are_capped_oldest_first(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    # Memory bounded by size as well as by time: past LEDGERBUS_DEDUP_MAX_IDS the oldest
    # ids are forgotten (JetStream's own window still drops a quick resend of any of them).
    rr = RunningRouter(await connect_as("router"), settings.replace(dedup_max_ids=3))
    await rr.start()
    cli, js = await connect_as("cli"), admin.jetstream()
    sent = [submitted(f"t{i}") for i in range(5)]
    for event in sent:
        await send(cli, CLI, event)
    await wait_for_records(js, 5)
    for i in (0, 4):  # the oldest is forgotten, the newest remembered
        await cli.jetstream().publish("in.cli.alice.task_submitted",
                                      codec.encode(TaskSubmitted(id=sent[i].id, task_id=f"again{i}", skill="echo")),
                                      headers={subjects.HDR_MSG_ID: f"again-{i}"})
    *_, forgotten, remembered = await wait_for_records(js, 7)
    await rr.stop()
    assert (forgotten.key, forgotten.code) == ("again0", "ok")
    assert (remembered.key, remembered.code) == ("again4", "duplicate_message")


async def test_a_check_that_raises_rejects_the_message_and_the_router_lives(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    def broken(msg: Inbound, state: RouterState) -> Rejection | None:
        raise KeyError("a bug")

    checks = default_checks(settings.max_message_bytes, PolicyFile(settings.policy_path))
    router = Router(await connect_as("router"), settings, checks=[checks[0], broken, *checks[1:]])
    await router.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(router.run(stop))
    try:
        cli = await connect_as("cli")
        await send(cli, CLI, submitted("t1"))
        await send(cli, CLI, submitted("t2"))
        records = await wait_for_records(admin.jetstream(), 2)
        assert [(r.code, r.key) for r in records] == [("internal_error", "_"), ("internal_error", "_")]
        assert records[0].reason == "a router check failed on this message (KeyError)"
        assert not serving.done()
        assert await work_count(admin.jetstream()) == 0
    finally:
        stop.set()
        await serving


async def test_only_an_operator_forks_and_only_a_fork_keeps_outputs_nobody_ran(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    from ledgerbus.bus.events import CheckpointSaved, Kept, MemoryImage, PlanStep, PlanSubmitted, Replay, RunForked

    cli, agent = await connect_as("cli"), await connect_as("agent")
    kept = Kept(source_task_id="old-1", output={"text": "done before"})
    recording = Replay(recording="0" * 64)
    forked = RunForked(id=new_id(), task_id="new-1", source_task_id="old-1", at_seq=1, recording="0" * 64)
    await send(agent, AGENT, forked)
    await send(agent, AGENT, CheckpointSaved(id=new_id(), agent="worker-1", checkpoint_id="c1",
                                             memory=MemoryImage(observation=["planted"])))
    await send(cli, CLI, PlanSubmitted(id=new_id(), task_id="p1", steps=[PlanStep(id="a", skill="echo")],
                                       kept={"a": kept}))
    await send(cli, CLI, TaskSubmitted(id=new_id(), task_id="t1", skill="echo", kept=kept))
    # The same from an operator, in a fork: accepted, and the kept subtask is done at once.
    await send(cli, CLI, forked)
    await send(cli, CLI, TaskSubmitted(id=new_id(), task_id="t2", skill="echo", kept=kept, replay=recording))
    await send(cli, CLI, submitted("t3"))
    records = (await wait_for_records(admin.jetstream(), 7))[:6]
    assert [(r.kind, r.verdict, r.code) for r in records] == [
        ("run_forked", "rejected", "kind_not_allowed"),
        ("checkpoint_saved", "rejected", "bad_checkpoint"),
        ("plan_submitted", "rejected", "bad_plan"),
        ("task_submitted", "rejected", "bad_submission"),
        ("run_forked", "accepted", "ok"),
        ("task_submitted", "accepted", "ok"),
    ]
    assert "only an operator" in records[1].reason
    # t3's work item is published after t2's would have been: only it is there.
    await wait_until(lambda: _work_at_least(admin, 1), 10, what="t3 dispatched")
    assert await work_count(admin.jetstream()) == 1, "a kept subtask is dispatched to nobody"


async def _work_at_least(admin: Client, n: int) -> bool:
    return await work_count(admin.jetstream()) >= n


async def test_a_leader_whose_lease_went_while_a_batch_was_appended_decides_nothing_more(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    """The batch in hand is settled (its records are stored, its work dispatched), but the
    scheduler, the dead letters, a checkpoint and recovery are decisions of a leader: a
    router that finds its lease gone after the append makes none of them before stepping
    down (the next leader reads the log and decides)."""
    nc = await connect_as("router")
    router = Router(nc, settings, lease=Lease(nc.jetstream(), 30, "first"))
    decided: list[str] = []
    process, schedule = router.process, router.schedule

    async def process_then_lose_the_lease(msgs: list[Any]) -> None:
        await process(msgs)
        assert router.lease is not None
        router.lease.drop()  # as a lease that lapsed while the appends were in flight

    async def counted_schedule() -> None:
        decided.append("schedule")
        await schedule()

    router.process = process_then_lose_the_lease  # type: ignore[method-assign]
    router.schedule = counted_schedule  # type: ignore[method-assign]
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logged:
        serving = asyncio.create_task(router.run(stop))
        try:
            await send(await connect_as("cli"), CLI, submitted("last"))
            (record,) = await wait_for_records(admin.jetstream(), 1)
            assert record.key == "last" and record.accepted

            async def stepped_down() -> bool:
                return any(line["event"] == "stepped_down" for line in logged)

            await wait_until(stepped_down, 10, what="the router stepping down")
            assert decided == [], "the router scheduled after its lease had gone"
            assert await work_count(admin.jetstream()) == 1, "the batch in hand was not settled"
        finally:
            stop.set()
            await serving
