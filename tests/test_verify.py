"""agentctl audit verify: intact logs pass; a changed byte on disk, a weakened stream, or a
projection that no longer follows from the log is found and named."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig, StreamInfo, StreamState

from bus import codec, subjects
from bus.events import TaskSubmitted, new_id
from bus.server import NatsServer
from bus.settings import Settings
from bus.verify import config_findings
from projections import db as dbmod
from projections.rebuild import rebuild
from tests.conftest import RunningRouter
from tests.support import agentctl, wait_for_records

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
    assert [c["check"] for c in report["checks"]] == ["stream config", "contiguity", "hash chain", "projections"]


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


async def test_the_audit_stream_refuses_deletes_and_purges(
    running_router: RunningRouter, connect_as: Connect, admin: Client
) -> None:
    await five_records(connect_as, admin)
    js = admin.jetstream()
    with pytest.raises(nats.js.errors.APIError):
        await js.delete_msg(subjects.AUDIT_STREAM, 2)
    with pytest.raises(nats.js.errors.APIError):
        await js.purge_stream(subjects.AUDIT_STREAM)
    assert (await js.stream_info(subjects.AUDIT_STREAM)).state.messages == 5


def test_a_weakened_stream_configuration_is_named() -> None:
    weak = StreamConfig(name="AUDIT", deny_delete=False, deny_purge=True, allow_rollup_hdrs=True, max_age=3600,
                        max_msgs=1000)
    problems = config_findings(StreamInfo(config=weak, state=StreamState(0, 0, 0, 0, 0)))
    assert [p.split(" ")[0] for p in problems] == ["deny_delete", "rollup", "max_age", "max_msgs"]
