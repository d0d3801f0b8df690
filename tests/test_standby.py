"""A standby router takes over when the leader's lease lapses, and the audit chain goes
on without a gap or a fork: the leader killed under load, and the leader paused past its
lease and woken after a standby took over (it must not write, and goes back to waiting)."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest
from nats.aio.client import Client

from ledgerbus.bus import chain, codec
from ledgerbus.bus.cancel import stop_task
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.router import audit
from ledgerbus.router.audit import AuditLog
from ledgerbus.router.errors import AuditAppendError
from ledgerbus.router.state import RouterState
from tests.support import Proc, Procs, audit_records, send, stored_audit, wait_for_record, wait_until
from tests.test_e2e import joined

Connect = Callable[[str], Awaitable[Client]]
LEASE = {"LEDGERBUS_ROUTER_LEASE_S": "2"}


async def leader_and_standby(procs: Procs, admin: Client) -> tuple[Proc, Proc]:
    leader = await procs.start("router-a", "router", **LEASE)
    await leader.wait_logged("lease_acquired")
    standby = await procs.start("router-b", "router", **LEASE)
    await standby.wait_logged("standby")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "4")
    await wait_for_record(admin.jetstream(), joined("echo-1"))
    return leader, standby


async def submit(cli: Client, task_ids: list[str]) -> None:
    for task_id in task_ids:
        await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id=task_id, skill="echo", input={"n": task_id}))


async def all_completed(admin: Client, task_ids: list[str], timeout: float = 60.0) -> Counter[str]:
    """Wait until every task has an accepted completion; return the count per task."""
    wanted = set(task_ids)

    async def done() -> bool:
        records = await audit_records(admin.jetstream())
        return wanted <= {r.key for r in records if r.accepted and r.kind == "task_completed"}

    await wait_until(done, timeout, what="every task completed")
    records = await audit_records(admin.jetstream())
    return Counter(r.key for r in records if r.accepted and r.kind == "task_completed" and r.key in wanted)


async def assert_one_unbroken_chain(admin: Client) -> None:
    stored = await stored_audit(admin.jetstream())
    head = chain.verify(stored)  # raises naming the first record out of place
    assert head.seq == len(stored)


async def test_killing_the_leader_under_load_hands_over_without_loss_or_fork(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    leader, standby = await leader_and_standby(procs, admin)
    cli = await connect_as("cli")
    task_ids = [f"load-{i}" for i in range(60)]
    await submit(cli, task_ids[:30])
    await wait_for_record(admin.jetstream(), lambda r: r.kind == "task_completed" and r.accepted, timeout=30)
    leader.kill9()  # mid-load: some of the 30 done, some not
    await submit(cli, task_ids[30:])  # INGRESS takes them while nobody leads
    counts = await all_completed(admin, task_ids)
    assert set(counts.values()) == {1}, {k: n for k, n in counts.items() if n != 1}
    assert standby.logged("lease_acquired")
    await assert_one_unbroken_chain(admin)


async def test_a_paused_leader_steps_down_and_never_writes_after_the_takeover(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    leader, standby = await leader_and_standby(procs, admin)
    cli = await connect_as("cli")
    await submit(cli, ["before"])
    await all_completed(admin, ["before"])

    leader.proc.send_signal(signal.SIGSTOP)  # longer than the lease: the standby takes over
    try:
        await standby.wait_logged("lease_acquired", timeout=30)
        await submit(cli, [f"during-{i}" for i in range(10)])
        await all_completed(admin, [f"during-{i}" for i in range(10)])
        head_at_wake = (await admin.jetstream().stream_info("AUDIT")).state.last_seq
    finally:
        leader.proc.send_signal(signal.SIGCONT)
    await leader.wait_logged("stepped_down", timeout=30)
    # It went back to waiting for the lease, alive.
    await leader.wait_logged("standby")
    assert leader.proc.returncode is None

    after = [f"after-{i}" for i in range(10)]
    await submit(cli, after)
    counts = await all_completed(admin, ["before", *(f"during-{i}" for i in range(10)), *after])
    assert set(counts.values()) == {1}, counts
    await assert_one_unbroken_chain(admin)
    # Whatever the woken leader had in hand, it did not decide anything after the takeover.
    woke = [line for line in leader.log_lines() if line.get("event") in ("scheduled", "rejected")]
    assert all(line.get("seq", 0) <= head_at_wake for line in woke), woke



async def test_the_lease_is_one_holder_at_a_time_and_a_lost_one_stays_lost(connect_as: Connect) -> None:
    from ledgerbus.router.lease import Lease

    nc = await connect_as("router")
    first, second = Lease(nc.jetstream(), 30, "first"), Lease(nc.jetstream(), 30, "second")
    assert await first.try_acquire() and first.held
    assert not await second.try_acquire() and not second.held
    assert await second.holder() == "first"
    assert await first.renew() and first.held
    await first.release()  # a clean stop: the next may take it at once
    assert not first.held
    assert await second.try_acquire() and await second.holder() == "second"
    # A holder that was paused while another took over cannot write its way back.
    first.revision = 1  # its last write, long since overwritten
    assert not await first.renew() and not first.held
    assert await second.renew() and await second.holder() == "second"


async def test_a_standby_takes_over_from_the_leaders_newest_snapshot_and_reads_only_the_tail(
    procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    env = {**LEASE, "LEDGERBUS_SNAPSHOT_EVERY": "10"}
    leader = await procs.start("router-a", "router", **env)
    await leader.wait_logged("lease_acquired")
    standby = await procs.start("router-b", "router", **env)
    await standby.wait_logged("standby")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "4")
    await wait_for_record(admin.jetstream(), joined("echo-1"))
    cli = await connect_as("cli")
    task_ids = [f"snap-{i}" for i in range(50)]
    await submit(cli, task_ids[:30])
    await all_completed(admin, task_ids[:30])
    await leader.wait_logged("snapshot_saved")
    saved = max(line["head_seq"] for line in leader.log_lines() if line.get("event") == "snapshot_saved")
    leader.kill9()
    await submit(cli, task_ids[30:])
    counts = await all_completed(admin, task_ids)
    assert set(counts.values()) == {1}, {k: n for k, n in counts.items() if n != 1}
    assert standby.logged("lease_acquired")
    took_over = next(line for line in standby.log_lines() if line.get("event") == "audit_recovered")
    assert took_over["from_snapshot"] >= saved
    assert took_over["tail"] == took_over["head_seq"] - took_over["from_snapshot"]
    await assert_one_unbroken_chain(admin)


def _decision(task_id: str) -> AuditRecord:
    return AuditRecord(seq=0, at=datetime.now(UTC), verdict="accepted", code="ok", reason="", principal="router",
                       kind="agent_left", key=task_id, msg_id=new_id(), ingress_seq=0, delivery=0)


async def test_a_stale_writers_pipelined_batch_never_lands_after_another_writers_record(
    connect_as: Connect, admin: Client
) -> None:
    # Two routers at the same head: the one that took the lease appends first, and the
    # other's batch of three, in flight at once, follows. Its first record is refused
    # (wrong last sequence); its second expects "last sequence = head + 1", which the
    # other's record just made true: a sequence alone would let it in, after a record it
    # does not follow. Seen in the chaos suite, as a stale leader's appends flushed by a
    # reconnect.
    js = admin.jetstream()
    head = await audit.recover(js, RouterState())
    new_leader = AuditLog(await Publisher(await connect_as("router")).start(), head)
    stale = AuditLog(await Publisher(await connect_as("router")).start(), head)

    taken = new_leader.seal(_decision("leader-1"))
    await new_leader.append([(*taken, {})])
    batch: list[tuple[AuditRecord, bytes, dict[str, str]]] = [
        (*stale.seal(_decision(f"stale-{i}")), {}) for i in range(3)]
    with pytest.raises(AuditAppendError, match=f"audit seq {head.seq + 1} not stored: .*wrong last sequence"):
        await stale.append(batch)

    stored = await stored_audit(js)
    assert [seq for seq, _ in stored][-1] == head.seq + 1, "nothing of the stale batch was stored"
    chain.verify(stored)  # one unbroken chain

    # The writer that holds the chain goes on pipelining as before.
    more: list[tuple[AuditRecord, bytes, dict[str, str]]] = [
        (*new_leader.seal(_decision(f"leader-{i}")), {}) for i in range(2, 5)]
    await new_leader.append(more)
    stored = await stored_audit(js)
    assert chain.verify(stored) == new_leader.head
    keys = [codec.decode_record(data).key for _, data in stored[-4:]]
    assert keys == ["leader-1", "leader-2", "leader-3", "leader-4"]


async def test_stopping_a_task_that_swallows_its_cancellation_still_ends_it() -> None:
    # As the lease keeper did when Python 3.11's wait_for dropped the cancel that came with
    # its renewal's reply: it slept on, and the router stepping down waited for ever.
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while swallowed < 2:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                swallowed += 1
        await asyncio.sleep(30)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await stop_task(task)
    assert task.cancelled() and swallowed == 2
