"""The chain's anchor outside itself: a router whose key has signed checkpoints refuses to
start a new chain on a log deleted or replaced whole, and `agentctl audit verify` reports
the restart; a normal restart, a fresh install and an operator's deliberate reset start."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from structlog.testing import capture_logs

from ledgerbus.bus import anchor, chain, codec, subjects
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.provision import provision
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.router.app import Router
from ledgerbus.router.errors import ChainRestartedError
from tests.conftest import RunningRouter
from tests.support import Procs, agentctl, wait_for_record, wait_until

Connect = Callable[[str], Awaitable[Client]]
CHAIN_STREAM = subjects.kv_stream(subjects.CHAIN_BUCKET)


@pytest.fixture
def tuned(settings: Settings) -> Settings:
    """A checkpoint after every three records, one message per batch: a few submissions
    are enough for the router to sign, and so to anchor, the chain."""
    return settings.replace(checkpoint_every=3, router_batch=1)


async def signed_log(tuned: Settings, connect_as: Connect, admin: Client) -> AuditRecord:
    """Run a router until it has signed a checkpoint over three submissions; stop it.
    Returns the checkpoint's record."""
    router = RunningRouter(await connect_as("router"), tuned)
    await router.start()
    try:
        cli = await connect_as("cli")
        for i in range(3):
            event = TaskSubmitted(id=new_id(), task_id=f"task-{i}", skill="echo")
            await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(event))
        cp = await wait_for_record(admin.jetstream(), lambda r: r.checkpoint is not None)
        await wait_until(lambda: _anchored(tuned, cp.seq), what="the checkpoint anchored")
    finally:
        await router.stop()
    return cp


async def _anchored(settings: Settings, seq: int) -> bool:
    found = anchor.read_file(anchor.file_path(settings.router_key_path))
    return found is not None and found.seq == seq


async def audit_count(admin: Client) -> int:
    return (await admin.jetstream().stream_info(subjects.AUDIT_STREAM)).state.last_seq


async def verify(settings: Settings, *args: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = await agentctl(settings, "audit", "verify", "--json", "--no-projections", *args)
    assert out, err
    return code, json.loads(out), err


async def test_a_router_refuses_to_start_a_new_chain_on_a_deleted_log_and_verify_reports_it(
    tuned: Settings, connect_as: Connect, admin: Client
) -> None:
    cp = await signed_log(tuned, connect_as, admin)
    await admin.jetstream().delete_stream(subjects.AUDIT_STREAM)

    with capture_logs() as logs, pytest.raises(ChainRestartedError) as refused:
        await Router(await connect_as("router"), tuned).start()
    message = str(refused.value)
    assert message.startswith("refusing to start a new audit chain: the chain restarted: ")
    assert f"checkpoint at seq {cp.seq} covering seq {cp.seq - 1} with head {cp.prev_hash}" in message
    assert "the stream is empty" in message and "--accept-new-chain" in message
    found = [e for e in logs if e["event"] == "chain_restart_found"]
    assert {e["source"] for e in found} == {anchor.BUCKET_SOURCE, f"file {anchor.file_path(tuned.router_key_path)}"}
    assert all(e["anchor_seq"] == cp.seq and e["head_seq"] == 0 for e in found)
    assert await audit_count(admin) == 0  # no new chain begun

    code, report, _ = await verify(tuned)
    assert code == 1 and report["restarted"] is True
    assert report["problem"].startswith(f"anchor: the chain restarted: {anchor.BUCKET_SOURCE} says checkpoint at seq "
                                        f"{cp.seq}")
    assert report["first_bad_seq"] == 1
    assert [a["source"] for a in report["anchors"]] == [
        anchor.BUCKET_SOURCE, f"file {anchor.file_path(tuned.router_key_path)}"]
    assert all(not a["ok"] and a["checkpoint_seq"] == cp.seq and a["chain_head"] == cp.prev_hash
               for a in report["anchors"])
    assert [c["check"] for c in report["checks"] if not c["ok"]] == ["anchor"]


async def test_agentctl_router_says_why_it_will_not_start_and_exits(
    tuned: Settings, connect_as: Connect, admin: Client, procs: Procs
) -> None:
    cp = await signed_log(tuned, connect_as, admin)
    # Whoever deletes the log may delete the bucket too: the file beside the key remains.
    await admin.jetstream().delete_stream(subjects.AUDIT_STREAM)
    await admin.jetstream().delete_stream(CHAIN_STREAM)

    router = await procs.start("router", "router")
    code = await router.proc.wait()
    assert code != 0
    text = router.log.read_text()
    assert "Traceback" not in text
    assert (f"agentctl: refusing to start a new audit chain: the chain restarted: file "
            f"{anchor.file_path(tuned.router_key_path)} says checkpoint at seq {cp.seq}") in text
    assert router.logged("chain_restart_found")
    assert await audit_count(admin) == 0

    # The router made the bucket again, empty: only the file still knows.
    code, report, _ = await verify(tuned)
    assert code == 1 and report["restarted"] is True
    bucket, in_file = report["anchors"]
    assert bucket["ok"] and bucket["checkpoint_seq"] is None
    assert not in_file["ok"] and "the stream is empty" in in_file["detail"]


async def test_a_log_replaced_by_another_chain_is_refused_and_reported(
    tuned: Settings, connect_as: Connect, admin: Client
) -> None:
    cp = await signed_log(tuned, connect_as, admin)
    await admin.jetstream().delete_stream(subjects.AUDIT_STREAM)
    # A longer history that chains correctly, written with the router's NATS rights but
    # not its key: it passes the chain check, and its record at the anchored seq is not
    # the anchored checkpoint.
    await provision(admin.jetstream(), tuned)
    router_nc = await connect_as("router")
    head = chain.ChainHead()
    for i in range(1, cp.seq + 3):
        rec = AuditRecord(seq=i, at=datetime.now(UTC), verdict="accepted", code="ok", reason="", principal="cli-x",
                          kind="task_submitted", key=f"t{i}", msg_id=f"m{i}", ingress_seq=i, delivery=1,
                          event=TaskSubmitted(id=f"m{i}", task_id=f"t{i}", skill="echo"))
        sealed, data = chain.seal(rec, head.hash)
        await router_nc.jetstream().publish(f"audit.accepted.task_submitted.t{i}", data,
                                            headers={subjects.HDR_EXPECTED_LAST_SEQ: str(head.seq)})
        head = chain.ChainHead(i, sealed.hash)

    with pytest.raises(ChainRestartedError, match=f"the stream's record {cp.seq} is a task_submitted record"):
        await Router(router_nc, tuned).start()
    assert await audit_count(admin) == cp.seq + 2  # nothing appended to the impostor

    code, report, _ = await verify(tuned)
    assert code == 1 and report["restarted"] is True
    anchor_check = next(c for c in report["checks"] if c["check"] == "anchor")
    assert not anchor_check["ok"] and anchor_check["seq"] == cp.seq


async def test_a_normal_restart_starts_and_the_anchor_follows_the_checkpoints(
    tuned: Settings, connect_as: Connect, admin: Client
) -> None:
    first = await signed_log(tuned, connect_as, admin)
    router = RunningRouter(await connect_as("router"), tuned)
    await router.start()
    try:
        cli = await connect_as("cli")
        for i in range(3):
            event = TaskSubmitted(id=new_id(), task_id=f"again-{i}", skill="echo")
            await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(event))
        second = await wait_for_record(admin.jetstream(), lambda r: r.checkpoint is not None and r.seq > first.seq)
        await wait_until(lambda: _anchored(tuned, second.seq), what="the second checkpoint anchored")
    finally:
        await router.stop()
    in_bucket = await anchor.read_bucket(admin.jetstream())
    assert in_bucket is not None and in_bucket.seq == second.seq and in_bucket.checkpoint == second.checkpoint
    history = await (await admin.jetstream().key_value(subjects.CHAIN_BUCKET)).history(subjects.CHAIN_HEAD_KEY)
    assert {anchor.decode(e.value or b"", "history").seq for e in history} >= {first.seq, second.seq}

    code, report, _ = await verify(tuned)
    assert code == 0, report
    assert report["restarted"] is False and all(a["ok"] for a in report["anchors"])
    assert f"the stream holds the checkpoint at seq {second.seq}" in report["checks"][-1]["detail"]


async def test_the_router_audits_on_while_a_checkpoint_is_anchored_and_the_anchors_keep_their_order(
    tuned: Settings, connect_as: Connect, admin: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The anchor file's write is held until the router has audited what came after the
    # checkpoint: a router that anchored inside its loop would audit nothing meanwhile.
    release, written = threading.Event(), []
    real_write = anchor.write_file

    def held_write(path: Path, new: anchor.Anchor) -> None:
        release.wait(5)
        real_write(path, new)
        written.append(new.seq)

    monkeypatch.setattr(anchor, "write_file", held_write)
    js = admin.jetstream()
    router = RunningRouter(await connect_as("router"), tuned)
    await router.start()
    try:
        cli = await connect_as("cli")
        for i in range(6):  # two checkpoints: after three records, and after three more
            event = TaskSubmitted(id=new_id(), task_id=f"task-{i}", skill="echo")
            await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(event))
        last = await wait_for_record(js, lambda r: r.checkpoint is not None and r.checkpoint.covers_seq >= 7)
        assert written == [] and not release.is_set()
        # Stopped while both writes are still held: the stop waits for them.
        threading.Timer(0.5, release.set).start()
    finally:
        await router.stop()
        release.set()
    first = await wait_for_record(js, lambda r: r.checkpoint is not None)
    assert written == [first.seq, last.seq]
    assert await _anchored(tuned, last.seq), "the stop returned before the last anchor was written"
    history = await (await js.key_value(subjects.CHAIN_BUCKET)).history(subjects.CHAIN_HEAD_KEY)
    assert [anchor.decode(e.value or b"", "history").seq for e in history] == [first.seq, last.seq]


async def test_a_fresh_install_starts_a_chain_and_anchors_its_first_checkpoint(
    tuned: Settings, connect_as: Connect, admin: Client
) -> None:
    path = anchor.file_path(tuned.router_key_path)
    assert not path.exists()
    cp = await signed_log(tuned, connect_as, admin)
    assert cp.seq == 4 and anchor.read_file(path) is not None
    assert path.stat().st_mode & 0o777 == 0o600


async def test_an_operator_may_accept_a_new_chain_once_and_the_break_is_in_it(
    tuned: Settings, connect_as: Connect, admin: Client
) -> None:
    cp = await signed_log(tuned, connect_as, admin)
    await admin.jetstream().delete_stream(subjects.AUDIT_STREAM)
    router_nc = await connect_as("router")

    accepting = Router(router_nc, tuned, accept_new_chain=True)
    await accepting.start()
    stop = asyncio.Event()
    stop.set()
    await accepting.run(stop)  # lets go of what start bound
    restart = await wait_for_record(admin.jetstream(), lambda r: r.checkpoint is not None)
    assert await audit_count(admin) == 1
    assert restart.seq == 1 and restart.code == anchor.RESTART_CODE and restart.checkpoint is not None
    assert f"checkpoint at seq {cp.seq} covering seq {cp.seq - 1} head {cp.prev_hash}" in restart.reason
    assert not accepting.accept_new_chain  # for that start only

    # The anchors moved to the new chain: a plain restart starts.
    plain = RunningRouter(router_nc, tuned)
    await plain.start()
    await plain.stop()

    code, report, _ = await verify(tuned)
    assert code == 0, report
    assert report["restarted"] is True
    assert report["restarts"] == [{"seq": 1, "reason": restart.reason}]
    detail = next(c for c in report["checks"] if c["check"] == "anchor")["detail"]
    assert "the chain restarted at seq 1, accepted by the operator" in detail


async def test_an_anchor_of_another_key_does_not_stop_the_router(
    tuned: Settings, connect_as: Connect, admin: Client, tmp_path: Path
) -> None:
    await signed_log(tuned, connect_as, admin)
    await admin.jetstream().delete_stream(subjects.AUDIT_STREAM)
    # A router with its own key (never signed this chain) only notes the other key's anchor.
    other = tuned.replace(router_key_path=tmp_path / "other-keys" / "router.key")
    with capture_logs() as logs:
        router = RunningRouter(await connect_as("router"), other)
        await router.start()
        await router.stop()
    assert any(e["event"] == "chain_anchor_not_ours" and e["source"] == anchor.BUCKET_SOURCE for e in logs)
