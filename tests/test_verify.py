"""agentctl audit verify: intact logs pass; a changed byte on disk, a weakened stream, or a
projection that no longer follows from the log is found and named."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.js.api import StreamConfig, StreamInfo, StreamState

from ledgerbus.bus import chain, codec, signing, subjects
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.records import AuditRecord, Checkpoint
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from ledgerbus.bus.verify import config_findings
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.rebuild import rebuild
from tests.conftest import RunningRouter
from tests.support import agentctl, audit_records, wait_for_record, wait_for_records

Connect = Callable[[str], Awaitable[Client]]


async def five_records(connect_as: Connect, admin: Client) -> None:
    cli = await connect_as("cli")
    for i in range(5):
        event = TaskSubmitted(id=new_id(), task_id=f"task-{i}", skill="echo", input={"i": i})
        await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(event))
    await wait_for_records(admin.jetstream(), 5)


async def verify(settings: Settings, *args: str) -> tuple[int, dict]:
    code, out, err = await agentctl(settings, "audit", "verify", "--json", *args)
    assert out, err
    return code, json.loads(out)


async def test_an_intact_log_and_projection_verify(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    await five_records(connect_as, admin)
    live = tmp_path / "live.db"
    assert await rebuild(admin.jetstream(), live) == 5
    code, report = await verify(settings, "--db", str(live))
    assert code == 0, report
    assert report["ok"] and report["head"]["seq"] == 5 and report["first_bad_seq"] is None
    assert [c["check"] for c in report["checks"]] == [
        "stream config", "contiguity", "hash chain", "checkpoints", "anchor", "projections"]


async def test_a_byte_changed_on_disk_is_found_at_its_sequence(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings,
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    await five_records(connect_as, admin)
    await running_router.stop()
    await nats_server.stop()
    [block] = (tmp_path / "jetstream").rglob("AUDIT/msgs/*.blk")
    data = block.read_bytes()
    at = data.index(b'"key":"task-2"')  # record 3 is the third submission
    block.write_bytes(data[:at] + data[at:].replace(b"task-2", b"task-9", 1))
    await nats_server.restart()

    code, report = await verify(settings, "--no-projections")
    assert code == 1
    assert report["first_bad_seq"] == 3
    assert "seq 3" in report["problem"]


async def test_a_projection_that_does_not_follow_from_the_log_is_found(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    await five_records(connect_as, admin)
    live = tmp_path / "live.db"
    await rebuild(admin.jetstream(), live)
    db = await dbmod.open_db(live)
    await db.execute("UPDATE tasks SET status = 'completed' WHERE task_id = 'task-1'")
    await db.close()
    code, report = await verify(settings, "--db", str(live))
    assert code == 1
    assert report["problem"] == "projections: tables differ from a rebuild at seq 5: tasks"


async def test_no_projector_means_the_projections_were_not_checked(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    await five_records(connect_as, admin)
    code, report = await verify(settings)
    assert code == 1
    assert report["problem"].startswith("projections: not checked: no projector answers")


async def test_the_audit_stream_refuses_deletes_and_a_purge_outside_the_rule_is_named(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    await five_records(connect_as, admin)
    js = admin.jetstream()
    with pytest.raises(nats.js.errors.APIError):
        await js.delete_msg(subjects.AUDIT_STREAM, 2)
    # Only the router (the retention rule's, router/retention.py) and admin may purge.
    cli = (await connect_as("cli-tester")).jetstream(timeout=2)
    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.APIError)):
        await cli.purge_stream(subjects.AUDIT_STREAM, seq=3)
    assert (await js.stream_info(subjects.AUDIT_STREAM)).state.messages == 5
    # An admin can; verify names the records that left with no record allowing it.
    await running_router.stop()
    await js.purge_stream(subjects.AUDIT_STREAM, seq=3)
    code, report = await verify(settings, "--no-projections")
    assert code == 1
    assert report["problem"].startswith("archive: segment missing: records 1..2 left the stream and are in no segment")
    assert {c["check"]: c["ok"] for c in report["checks"]}["hash chain"]  # the live records still chain


def test_a_weakened_stream_configuration_is_named() -> None:
    weak = StreamConfig(name="AUDIT", deny_delete=False, deny_purge=True, allow_rollup_hdrs=True, max_age=3600,
                        max_msgs=1000)
    problems = config_findings(StreamInfo(config=weak, state=StreamState(0, 0, 0, 0, 0)))
    assert [p.split(" ")[0] for p in problems] == ["deny_delete", "rollup", "max_age", "max_msgs"]


async def router_writing_checkpoints(settings: Settings, connect_as: Connect, **changes: object) -> tuple[RunningRouter, Settings]:
    tuned = settings.replace(**changes)
    router = RunningRouter(await connect_as("router"), tuned)
    await router.start()
    return router, tuned


async def submit_n(connect_as: Connect, admin: Client, n: int, total: int) -> list:
    cli = await connect_as("cli")
    for _ in range(n):
        await cli.jetstream().publish("in.cli.alice.task_submitted",
                                      codec.encode(TaskSubmitted(id=new_id(), task_id=new_id(), skill="echo")))
    return await wait_for_records(admin.jetstream(), total)


async def test_checkpoints_are_signed_every_n_records_and_verify(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    router, tuned = await router_writing_checkpoints(settings, connect_as, checkpoint_every=4, router_batch=2)
    try:
        # 10 submissions in batches of at most 2: a checkpoint after 4 records, and after 8.
        records = await submit_n(connect_as, admin, 10, 12)
    finally:
        await router.stop()
    checkpoints = [r for r in records if r.checkpoint is not None]
    assert len(checkpoints) >= 2
    for cp_record in checkpoints:
        assert cp_record.checkpoint.covers_seq == cp_record.seq - 1  # type: ignore[union-attr]
        assert cp_record.checkpoint.at == cp_record.at  # type: ignore[union-attr]  # signed, not only chained
        assert cp_record.principal == "router" and cp_record.kind == "checkpoint"
    code, report = await verify(tuned, "--no-projections")
    assert code == 0, report
    assert report["checks"][3]["detail"].startswith(f"{len(checkpoints)} signed checkpoints valid")


async def test_a_forged_checkpoint_is_found(settings: Settings, connect_as: Connect, admin: Client) -> None:
    router, tuned = await router_writing_checkpoints(settings, connect_as, checkpoint_every=3, router_batch=1)
    await submit_n(connect_as, admin, 3, 4)
    await router.stop()
    # Someone with the router's NATS rights but not its key appends a checkpoint of their own.
    records = await audit_records(admin.jetstream())
    head = chain.ChainHead(records[-1].seq, records[-1].hash)
    forged = signing.sign(Ed25519PrivateKey.generate(), Checkpoint(
        covers_seq=head.seq, chain_head=head.hash, prev_checkpoint_seq=records[-1].seq, key_id=""))
    forged = msgspec.structs.replace(forged, key_id=signing.key_id(signing.load_public(
        signing.public_path(tuned.router_key_path))))
    record, data = chain.seal(msgspec.structs.replace(records[-1], seq=head.seq + 1, checkpoint=forged), head.hash)
    router_nc = await connect_as("router")
    await router_nc.jetstream().publish("audit.accepted.checkpoint.router", data,
                                        headers={subjects.HDR_EXPECTED_LAST_SEQ: str(head.seq)})
    code, report = await verify(tuned, "--no-projections")
    assert code == 1
    assert report["first_bad_seq"] == record.seq
    assert "signature does not verify" in report["problem"]


async def test_a_history_rewritten_without_the_routers_key_is_found(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    # No router runs: the writer chains its own records correctly but cannot sign them.
    tuned = settings.replace(checkpoint_every=3, router_batch=1)
    writer = (await connect_as("router")).jetstream()
    head = chain.ChainHead()
    for i in range(1, 9):
        rec = AuditRecord(seq=i, at=datetime.now(UTC), verdict="accepted", code="ok", reason="", principal="cli-x",
                          kind="task_submitted", key=f"t{i}", msg_id=f"m{i}", ingress_seq=i, delivery=1,
                          event=TaskSubmitted(id=f"m{i}", task_id=f"t{i}", skill="echo"))
        sealed, data = chain.seal(rec, head.hash)
        await writer.publish(f"audit.accepted.task_submitted.t{i}", data,
                             headers={subjects.HDR_EXPECTED_LAST_SEQ: str(head.seq)})
        head = chain.ChainHead(i, sealed.hash)
    signing.load_or_create(tuned.router_key_path)  # the verifier has the real router's public key
    code, report = await verify(tuned, "--no-projections")
    assert code == 1
    assert [c["check"] for c in report["checks"] if not c["ok"]] == ["checkpoints"]
    assert report["first_bad_seq"] == 5  # more than 3 + 1 records with no checkpoint


async def test_an_idle_router_checkpoints_after_its_interval(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    router, _ = await router_writing_checkpoints(settings, connect_as, checkpoint_interval_s=0.2)
    try:
        await submit_n(connect_as, admin, 2, 2)
        cp = await wait_for_record(admin.jetstream(), lambda r: r.checkpoint is not None, timeout=10)
        assert cp.checkpoint.covers_seq == 2  # type: ignore[union-attr]
    finally:
        await router.stop()
