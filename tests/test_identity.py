"""Identity is the subject: each principal is its own NATS user, bound to its own subjects,
inbox and work consumers; the server refuses everything else, and nothing enters the log."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import nats.errors
import pytest
from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.connection import ConnectionEvents, connect
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.identity import Registry
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import agentctl, wait_for_records, work_count

Connect = Callable[[str], Awaitable[Client]]


def submission(task_id: str) -> bytes:
    return codec.encode(TaskSubmitted(id=new_id(), task_id=task_id, skill="echo"))


async def refused(nc: Client, subject: str, body: bytes = b"{}") -> bool:
    """Whether a JetStream publish is refused (no PubAck comes for a forbidden subject)."""
    try:
        await nc.jetstream().publish(subject, body, timeout=0.5)
    except (TimeoutError, nats.errors.Error):
        return True
    return False


async def test_an_agent_may_speak_only_as_itself_and_never_write_the_log_or_work(
    running_router: RunningRouter, settings: Settings, admin: Client
) -> None:
    events = ConnectionEvents()
    a1 = await connect(settings, "agent-a1", events=events)
    try:
        assert await refused(a1, "in.agent.b1.agent_joined")
        assert await refused(a1, "in.cli.carol.task_submitted", submission("t1"))
        assert await refused(a1, "audit.accepted.task_submitted.t1")
        assert await refused(a1, "work.echo")
        # Its own subject works: the router hears it (and rejects the body, not a join).
        assert not await refused(a1, "in.agent.a1.agent_joined")

        await a1.subscribe("_INBOX_agent-b1.>")
        await a1.flush()
        with pytest.raises((TimeoutError, nats.errors.Error)):
            # b1's skill is sleep; a1 may pull only echo work.
            await a1.jetstream(timeout=1).pull_subscribe("work.sleep", durable="skill-sleep", stream="WORK")
        await a1.flush()
    finally:
        await a1.close()
    text = "\n".join(events.violations)
    for forbidden in ('"in.agent.b1.agent_joined"', '"audit.accepted.task_submitted.t1"', '"work.echo"',
                      'subscription to "_INBOX_agent-b1.>"', "$JS.API.CONSUMER.INFO.WORK.skill-sleep"):
        assert forbidden.lower() in text.lower(), f"{forbidden} was not refused:\n{text}"
    [only] = await wait_for_records(admin.jetstream(), 1)
    assert (only.principal, only.code) == ("agent-a1", "schema")
    assert await work_count(admin.jetstream()) == 0


async def test_a_cli_user_cannot_submit_as_another(running_router: RunningRouter, settings: Settings,
                                                   admin: Client) -> None:
    carol = await connect(settings, "cli-carol")
    try:
        assert await refused(carol, "in.cli.tester.task_submitted", submission("as-tester"))
        assert not await refused(carol, "in.cli.carol.task_submitted", submission("as-carol"))
    finally:
        await carol.close()
    [record] = await wait_for_records(admin.jetstream(), 1)
    assert (record.principal, record.key, record.code) == ("cli-carol", "as-carol", "ok")


async def test_a_principal_publishes_metrics_only_under_its_own_name(running_router: RunningRouter,
                                                                    settings: Settings) -> None:
    # The gateway labels each snapshot with the principal its subject names: a forged one
    # would put figures in another process's name.
    a1 = await connect(settings, "agent-a1")
    try:
        for other in ("agent-b1", "router", "projector", "cli-tester"):
            assert await refused(a1, subjects.metrics(other, "forged"), b"ledgerbus_tasks 1\n"), other
        assert not await refused(a1, subjects.metrics("agent-a1", "own"), b"ledgerbus_tasks 1\n")
    finally:
        await a1.close()


async def test_only_the_projector_writes_projection_snapshots_a_cli_user_reads_them_an_agent_cannot(
    settings: Settings, admin: Client
) -> None:
    name, events = "projection-000000000001", ConnectionEvents()
    projector = await connect(settings, "projector")
    carol = await connect(settings, "cli-carol", events=events)
    a1 = await connect(settings, "agent-a1", events=events)
    try:
        await (await projector.jetstream().object_store(subjects.PROJECTION_BUCKET)).put(name, b"snapshot")
        readable = await carol.jetstream(timeout=1).object_store(subjects.PROJECTION_BUCKET)
        assert (await readable.get(name)).data == b"snapshot"  # agentctl replay reads them
        with pytest.raises((TimeoutError, nats.errors.Error)):
            await readable.put(name, b"forged")
        for attempt in (lambda: a1.jetstream(timeout=0.5).object_store(subjects.PROJECTION_BUCKET),
                        lambda: a1.jetstream(timeout=0.5).get_msg(subjects.obj_stream(subjects.PROJECTION_BUCKET), 1)):
            with pytest.raises((TimeoutError, nats.errors.Error)):
                await attempt()
    finally:
        for nc in (projector, carol, a1):
            await nc.close()
    text = "\n".join(events.violations)
    for forbidden in (f'"{subjects.obj_chunks(subjects.PROJECTION_BUCKET)}', "STREAM.INFO.OBJ_projections",
                      "STREAM.MSG.GET.OBJ_projections"):
        assert forbidden.lower() in text.lower(), f"{forbidden} was not refused:\n{text}"
    stored = await admin.jetstream().object_store(subjects.PROJECTION_BUCKET)
    assert (await stored.get(name)).data == b"snapshot"


async def test_keys_add_admits_a_new_agent_once_the_server_reloads(
    settings: Settings, nats_server: NatsServer, admin: Client
) -> None:
    with pytest.raises(ConfigError, match="no credentials for agent-newbie"):
        await connect(settings.replace(connect_timeout_s=0.5), "agent-newbie")
    code, out, err = await agentctl(settings, "keys", "add", "agent", "newbie", "--skills", "echo,llm.chat",
                                    "--pid-file", "/nonexistent/nats.pid")
    assert code == 0, err
    assert "agent-newbie" in out and "reload nats-server to apply" in err
    assert {i.user for i, _ in Registry.load(settings.auth_dir).entries.values()} >= {"agent-newbie", "agent-a1"}
    await nats_server.reload()
    nc = await connect(settings, "agent-newbie")
    try:
        assert not await refused(nc, "in.agent.newbie.agent_joined")
        assert await refused(nc, "in.agent.a1.agent_joined")
    finally:
        await nc.close()
    code, out, _ = await agentctl(settings, "keys", "list", "--json")
    assert {"principal": "agent-newbie", "kind": "agent", "skills": "echo,llm.chat"} in json.loads(out)


async def test_bad_names_and_kinds_are_refused_with_a_message(settings: Settings) -> None:
    for args, message in ((["agent", "Bad Name"], "agent name"), (["cli", "x", "--skills", "echo"], "skills are for agents"),
                          (["router", "extra"], "router has no name")):
        code, _, err = await agentctl(settings, "keys", "add", *args)
        assert code == 3 and message in err, err


@pytest.mark.parametrize("principal", ["agent-a1", "cli-carol", "projector", "router"])
async def test_only_an_admin_may_delete_purge_or_make_streams(
    running_router: RunningRouter, settings: Settings, admin: Client, principal: str
) -> None:
    events = ConnectionEvents()
    nc = await connect(settings, principal, events=events)
    jsm = nc.jetstream(timeout=0.5)
    attempts: dict[str, Callable[[], Awaitable[object]]] = {
        "delete AUDIT": lambda: jsm.delete_stream(subjects.AUDIT_STREAM),
        "purge WORK": lambda: jsm.purge_stream(subjects.WORK_STREAM),
        "delete the router's consumer": lambda: jsm.delete_consumer(subjects.INGRESS_STREAM, subjects.ROUTER_CONSUMER),
    }
    if principal != "router":  # the router provisions its own streams (docs/architecture.md)
        attempts["make a stream"] = lambda: jsm.add_stream(name="ROGUE", subjects=["rogue.>"])
    try:
        for what, attempt in attempts.items():
            with pytest.raises((TimeoutError, nats.errors.Error)):
                await attempt()
            assert events.violations, f"{principal} could {what}"
            events.violations.clear()
    finally:
        await nc.close()
    js = admin.jetstream()
    names = [s.config.name for s in await js.streams_info()]
    assert "ROGUE" not in names and {"AUDIT", "WORK", "INGRESS"} <= set(names)
    assert (await js.consumer_info(subjects.INGRESS_STREAM, subjects.ROUTER_CONSUMER)).name == "router"
