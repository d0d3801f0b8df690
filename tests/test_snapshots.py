"""Router snapshots (router/snapshots.py): saved in the background every so many records,
loaded at start with only the tail of the log read, passed over with a warning when they do
not check (damaged, another key, a head the log does not hold, an unknown format), and a
router killed while writing one loses and doubles nothing."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from structlog.testing import capture_logs

from ledgerbus.bus import anchor, signing, subjects
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.router import audit
from ledgerbus.router import snapshots as snaps
from ledgerbus.router.errors import ChainRestartedError
from ledgerbus.router.state import RouterState
from tests.conftest import RunningRouter
from tests.snapshot_support import assert_snapshots_fold_alike, canonical
from tests.support import Procs, agentctl, audit_records, send, wait_for_record, wait_until
from tests.test_e2e import joined

Connect = Callable[[str], Awaitable[Client]]


def submitted(task_id: str) -> TaskSubmitted:
    return TaskSubmitted(id=new_id(), task_id=task_id, skill="echo", input={"text": task_id})


async def stored(js: Any) -> dict[str, bytes]:
    """Every snapshot in the store by name, its bytes (the router stopped: while it runs,
    one listed may be deleted before it is read)."""
    store = await js.object_store(subjects.SNAPSHOT_BUCKET)
    infos = await snaps._list(store)
    return {i.name: (await store.get(i.name)).data for i in infos}


async def names(js: Any) -> list[str]:
    """The snapshots' names, oldest first (safe while the router runs)."""
    return sorted(i.name for i in await snaps._list(await js.object_store(subjects.SNAPSHOT_BUCKET)))


async def wait_for_snapshot(js: Any, at_least: int) -> str:
    """Wait until a snapshot at or after seq ``at_least`` is stored; its name."""
    found: list[str] = []

    async def saved() -> bool:
        found[:] = await names(js)
        return bool(found) and found[-1] >= snaps.name_of(at_least)

    await wait_until(saved, what=f"a snapshot at seq {at_least} or later")
    return found[-1]


async def alike(js: Any, settings: Settings, live: RouterState) -> None:
    """The router's state (``live``) is what a fold of the whole log gives, both without
    the records of INGRESS messages since acked (a starting router forgets them)."""
    state = RouterState(dedup_horizon_s=settings.dedup_horizon_s)
    await audit.recover(js, state, anchor.Watch())
    first = (await js.stream_info(subjects.INGRESS_STREAM)).state.first_seq
    state.seen.forget_acked_before(first)
    live.seen.forget_acked_before(first)
    assert canonical(live) == canonical(state)


def recovered(logs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in logs if e["event"] == "audit_recovered")


async def test_a_restarted_router_starts_from_its_newest_snapshot_and_reads_only_the_tail(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    tuned = settings.replace(snapshot_every=10, snapshot_keep=2)
    rr = RunningRouter(await connect_as("router"), tuned)
    await rr.start()
    cli, js = await connect_as("cli"), admin.jetstream()
    sent = 0

    async def positions() -> list[int]:
        return [int(name.removeprefix(snaps.PREFIX)) for name in await names(js)]

    # Batches of nine (several boundaries) until two snapshots are kept, the newest past
    # seq 30 (a boundary that comes while one is still being written passes it by).
    while sent < 300 and (len(at := await positions()) < 2 or at[-1] < 30):
        for _ in range(9):
            await send(cli, "cli", "alice", submitted(f"t{sent}"))
            sent += 1
        await wait_for_record(js, lambda r, last=f"t{sent - 1}": r.key == last)
    await rr.stop()
    saved = await stored(js)
    assert len(saved) == 2
    newest = max(saved)
    for i in range(sent, sent + 5):  # wait in INGRESS while no router runs
        await send(cli, "cli", "alice", submitted(f"t{i}"))
    await send(cli, "cli", "alice", submitted("t3"))  # a duplicate only the loaded state can catch
    before = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq

    with capture_logs() as logs:
        router = await rr.start()
    at = int(newest.removeprefix(snaps.PREFIX))
    done = recovered(logs)
    assert done["from_snapshot"] == at and done["tail"] == done["head_seq"] - at
    await wait_until(lambda: _len_is(js, before + 6), what="the six waiting messages audited")
    await rr.stop()
    records = await audit_records(js)
    assert [r.code for r in records if r.key == "t3"] == ["ok", "duplicate_task"]
    # The router's own state, loaded and folded on, is the whole log's fold.
    await alike(js, tuned, router.state)
    assert not [e for e in logs if e["event"] == "snapshot_rejected"]


async def _len_is(js: Any, count: int) -> bool:
    return (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq >= count


async def test_snapshot_and_tail_fold_to_the_whole_logs_state_at_every_position(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    rr = RunningRouter(await connect_as("router"), settings)
    await rr.start()
    cli, js = await connect_as("cli"), admin.jetstream()
    for i in range(20):
        await send(cli, "cli", "alice", submitted(f"t{i % 15}"))  # some duplicates, rejected
    await wait_until(lambda: _len_is(js, 20), what="20 records")
    await rr.stop()
    assert await assert_snapshots_fold_alike(js, settings, points=20) >= 20


def _envelope(data: bytes) -> snaps.Envelope:
    return msgspec.msgpack.decode(data, type=snaps.Envelope)


def _resigned(key: Ed25519PrivateKey, env: snaps.Envelope, head: ChainHead | None = None, **changes: Any) -> bytes:
    """``env`` with ``changes`` (and its body at ``head``), signed again with ``key``: only
    the change is wrong."""
    env = msgspec.structs.replace(env, **changes)
    if head is not None:
        body = msgspec.msgpack.decode(zlib.decompress(env.body), type=snaps.Body)
        raw = msgspec.msgpack.encode(msgspec.structs.replace(body, head_seq=head.seq, head_hash=head.hash))
        data = _envelope(snaps.seal(key, raw, head))
        env = msgspec.structs.replace(env, head_seq=head.seq, head_hash=head.hash, body=data.body, digest=data.digest)
    signature = key.sign(snaps._signed(env.version, env.head_seq, env.head_hash, env.digest)).hex()
    return msgspec.msgpack.encode(msgspec.structs.replace(env, signature=signature,
                                                          key_id=signing.key_id(signing.public_hex(key))))


async def test_a_snapshot_that_does_not_check_is_passed_over_with_a_warning_naming_why(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    tuned = settings.replace(snapshot_every=10)
    rr = RunningRouter(await connect_as("router"), tuned)
    await rr.start()
    cli, js = await connect_as("cli"), admin.jetstream()
    for i in range(25):
        await send(cli, "cli", "alice", submitted(f"t{i}"))
    await wait_until(lambda: _len_is(js, 25), what="25 records")
    await wait_for_snapshot(js, 10)
    await rr.stop()
    saved = await stored(js)
    good = max(saved)
    data = saved[good]
    env = _envelope(data)
    key = signing.load_or_create(tuned.router_key_path)
    last = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
    flipped = bytearray(env.body)
    flipped[len(flipped) // 2] ^= 0xFF
    bad = {  # each newer than the good one, each wrong in one way
        "flipped": msgspec.msgpack.encode(msgspec.structs.replace(env, body=bytes(flipped))),
        "other_key": _resigned(Ed25519PrivateKey.generate(), env),
        "not_the_logs_head": _resigned(key, env, ChainHead(env.head_seq, "ab" * 32)),
        "beyond_the_log": _resigned(key, env, ChainHead(last + 5, env.head_hash)),
        "unknown_version": _resigned(key, env, version=snaps.FORMAT + 1),
        "not_a_snapshot": b"\x00garbage",
    }
    # Written with the router's rights: only the router may write the store.
    store = await (await connect_as("router")).jetstream().object_store(subjects.SNAPSHOT_BUCKET)
    for n, payload in enumerate(bad.values(), start=1):
        await store.put(snaps.name_of(last + n), payload)

    with capture_logs() as logs:
        router = await rr.start()
    rejected = [e["reason"] for e in logs if e["event"] == "snapshot_rejected"]
    assert len(rejected) == len(bad), rejected
    expected = ["does not decode", "format version", "not the logs head", "AUDIT ends at seq", "has hash",
                "signed by key", "does not hash to the signed digest"]
    assert all(any(word in reason for word in expected) for reason in rejected), rejected
    assert any("format version" in r for r in rejected) and any("signed by key" in r for r in rejected)
    assert any("signed digest" in r for r in rejected) and any("has hash" in r for r in rejected)
    assert any("AUDIT ends at seq" in r for r in rejected)
    assert recovered(logs)["from_snapshot"] == int(good.removeprefix(snaps.PREFIX))
    # It serves: a new task is audited, and the state is the whole log's.
    await send(cli, "cli", "alice", submitted("after"))
    await wait_for_record(js, lambda r: r.key == "after" and r.accepted)
    await rr.stop()
    await alike(js, tuned, router.state)

    # None usable at all: the whole log is folded, as without snapshots. Every snapshot
    # goes (the second run may have saved one, under a bad one's name, and pruned the
    # oldest), then the bad ones are written again, to be passed over again.
    for name in await names(js):
        await store.delete(name)
    for n, payload in enumerate(bad.values(), start=1):
        await store.put(snaps.name_of(last + n), payload)
    with capture_logs() as logs:
        router = await rr.start()
    assert recovered(logs)["from_snapshot"] is None
    await rr.stop()
    await alike(js, tuned, router.state)


async def test_an_anchored_checkpoint_before_the_snapshot_is_still_checked(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    # A checkpoint at every boundary, a snapshot at every boundary: the anchored checkpoint
    # is inside the snapshot, not in the tail read after it.
    tuned = settings.replace(snapshot_every=5, checkpoint_every=5)
    rr = RunningRouter(await connect_as("router"), tuned)
    await rr.start()
    cli, js = await connect_as("cli"), admin.jetstream()
    for i in range(12):
        await send(cli, "cli", "alice", submitted(f"t{i}"))
    await wait_until(lambda: _len_is(js, 12), what="12 records")

    async def anchor_covered() -> bool:
        held = anchor.read_file(anchor.file_path(tuned.router_key_path))
        kept = await names(js)
        return held is not None and bool(kept) and int(kept[-1].removeprefix(snaps.PREFIX)) >= held.seq

    await wait_until(anchor_covered, what="a snapshot at or after the anchored checkpoint")
    await rr.stop()
    held = anchor.read_file(anchor.file_path(tuned.router_key_path))
    assert held is not None

    with capture_logs() as logs:
        await rr.start()
    assert recovered(logs)["from_snapshot"] is not None
    await rr.stop()

    # An anchor (signed by the router's key) naming another checkpoint at that seq: a
    # router starting from the snapshot refuses it exactly as one reading the whole log.
    key = signing.load_or_create(tuned.router_key_path)
    forged = anchor.Anchor(seq=held.seq, checkpoint=signing.sign(key, msgspec.structs.replace(
        held.checkpoint, chain_head="cd" * 32)), stream_created=held.stream_created)
    anchor.write_file(anchor.file_path(tuned.router_key_path), forged)
    refusals, starts = [], []
    for every in (5, 0):
        with capture_logs() as logs, pytest.raises(ChainRestartedError) as refused:
            await RunningRouter(await connect_as("router"), tuned.replace(snapshot_every=every)).start()
        refusals.append(str(refused.value))
        starts.append(recovered(logs)["from_snapshot"])
    assert starts[0] is not None and starts[1] is None
    assert refusals[0] == refusals[1]


async def test_a_router_killed_while_writing_a_snapshot_restarts_losing_and_doubling_nothing(
    procs: Procs, admin: Client, settings: Settings, connect_as: Connect
) -> None:
    every = {"LEDGERBUS_SNAPSHOT_EVERY": "8"}
    router = await procs.start("router", "router", LEDGERBUS_FAILPOINTS="router.snapshot_writing=kill@2", **every)
    await procs.start("projector", "projector")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "2")
    js = admin.jetstream()
    await wait_for_record(js, joined("echo-1"))
    cli = await connect_as("cli")
    task_ids: list[str] = []
    # Tasks, a few at a time, until the second snapshot's write dies after its first chunk,
    # before its entry.
    while router.proc.returncode is None and len(task_ids) < 400:
        for _ in range(5):
            task_ids.append(f"t{len(task_ids)}")
            await send(cli, "cli", "alice", submitted(task_ids[-1]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(router.proc.wait(), 0.5)
    assert router.proc.returncode == -9
    for _ in range(20):
        task_ids.append(f"t{len(task_ids)}")
        await send(cli, "cli", "alice", submitted(task_ids[-1]))
    again = await procs.start("router-2", "router", **every)
    await again.wait_logged("router_started")

    async def all_completed() -> bool:
        records = await audit_records(js)
        return set(task_ids) <= {r.key for r in records if r.accepted and r.kind == "task_completed"}

    await wait_until(all_completed, 60, what="every task completed")
    records = await audit_records(js)
    completed = Counter(r.key for r in records if r.accepted and r.kind == "task_completed")
    submissions = Counter(r.key for r in records if r.kind == "task_submitted")
    assert {completed[t] for t in task_ids} == {1} and {submissions[t] for t in task_ids} == {1}
    started = next(line for line in again.log_lines() if line.get("event") == "audit_recovered")
    assert started["from_snapshot"] is not None  # the first snapshot, the cut one passed over or never listed
    # A later snapshot is saved whole, and the chunks the killed write left are gone.
    await again.wait_logged("snapshot_saved")
    await again.stop()
    code, out, err = await agentctl(settings, "audit", "verify")
    assert code == 0, out + err
    assert await assert_snapshots_fold_alike(js, settings) == len(await audit_records(js))
    info = await js.stream_info(subjects.obj_stream(subjects.SNAPSHOT_BUCKET), subjects_filter="$O.snapshots.C.>")
    kept = {i.nuid for i in await snaps._list(await js.object_store(subjects.SNAPSHOT_BUCKET))}
    assert {s.rsplit(".", 1)[1] for s in (info.state.subjects or {})} <= kept


async def test_snapshots_off_saves_none_and_folds_the_whole_log(
    connect_as: Connect, admin: Client, settings: Settings
) -> None:
    tuned = settings.replace(snapshot_every=0)
    rr = RunningRouter(await connect_as("router"), tuned)
    await rr.start()
    cli, js = await connect_as("cli"), admin.jetstream()
    for i in range(12):
        await send(cli, "cli", "alice", submitted(f"t{i}"))
    await wait_until(lambda: _len_is(js, 12), what="12 records")
    await rr.stop()
    assert await stored(js) == {}
    with capture_logs() as logs:
        await rr.start()
    await rr.stop()
    assert recovered(logs)["from_snapshot"] is None and recovered(logs)["tail"] == recovered(logs)["head_seq"]


def test_an_empty_state_round_trips() -> None:
    state = RouterState()
    data = snaps.seal(key := Ed25519PrivateKey.generate(), snaps.encode_state(state, ChainHead()), ChainHead())
    _, body = snaps.open_envelope(data, signing.public_hex(key))
    assert canonical(snaps.restore(body, {}, state.seen._horizon.total_seconds())) == canonical(state)
