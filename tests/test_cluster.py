"""A three-node JetStream cluster: the shipped ``nats-cluster/`` configurations on loopback
ports, every stream and bucket at three replicas.

Under load, with the router, a standby, an echo agent and the projector as subprocesses
given all three URLs, the node leading both INGRESS and AUDIT is killed (SIGKILL): INGRESS
because its PubAcks are what a client sees, AUDIT because the chain's appends with
``Nats-Expected-Last-Sequence`` must survive a change of leader without a gap or a fork.
Leadership of INGRESS is first moved to AUDIT's leader, so one kill costs both an election.
The node is restarted and catches up, then a follower is killed and publishing goes on.
Every acknowledged submission completes exactly once, the chain verifies, and the live
projection equals a rebuild from the log.

The election times and the longest gap between PubAcks are printed (``pytest -s``) and,
when ``LEDGERBUS_CLUSTER_REPORT`` names a file, written there as JSON for the docs. They
are reported, not asserted: how long an election takes depends on the machine."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from ledgerbus.bus import chain, codec, query, subjects
from ledgerbus.bus.cluster import NODES, SHIPPED_CLIENT_PORTS, SHIPPED_CLUSTER_PORTS, NatsCluster
from ledgerbus.bus.connection import connect
from ledgerbus.bus.errors import BusError
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.identity import users_dir
from ledgerbus.bus.provision import STREAM_NAME_IN_USE, provision, transient
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from ledgerbus.projections.verify import compare_digest
from ledgerbus.router.lease import Lease
from tests.support import (
    HARNESS_USERS,
    REPO,
    TEST_PRINCIPALS,
    Procs,
    auth_dir,
    stored_audit,
    suite_settings,
    wait_for_record,
    wait_until,
)
from tests.test_e2e import joined

Connect = Callable[[str], Awaitable[Client]]
T = TypeVar("T")
STREAMS = (subjects.INGRESS_STREAM, subjects.AUDIT_STREAM, subjects.WORK_STREAM, f"KV_{subjects.AGENTS_BUCKET}",
           f"KV_{subjects.ROUTER_BUCKET}")
# The default lease, not the suite's short one: a router steps down 8 s after its last
# renewal, about as long as an election of the router bucket's leader can take here.
ROUTER_ENV = {"LEDGERBUS_ROUTER_LEASE_S": "10"}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with NatsCluster(tmp_path / "cluster", REPO / "nats-cluster", TEST_PRINCIPALS, HARNESS_USERS) as c:
        yield c


@pytest.fixture
def settings(cluster: NatsCluster, tmp_path: Path, workspace_root: Path) -> Settings:
    """The suite's settings (tests/conftest.py) with the cluster's three URLs and three replicas."""
    return suite_settings(
        cluster.url, tmp_path, workspace_root, cluster.auth_dir, stream_replicas=3,
        # Longer than an election (up to ~9 s here), so a task whose in-progress acks went
        # unanswered while WORK's consumer had no leader is not run a second time while the
        # first run goes on. Short enough that a task whose report failed comes back soon.
        work_ack_wait_s=10.0,
    )


@dataclass
class Publisher:
    """Submits an echo task every ``interval`` seconds, as a client should: each one retried
    with the same message id until JetStream acknowledges it. Notes when each ack came."""

    cli: Client
    interval: float = 0.02
    acked: dict[str, float] = field(default_factory=dict)
    """Task id → when its PubAck came (monotonic)."""
    failed_attempts: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        js = self.cli.jetstream(timeout=1)
        subject = subjects.ingress(subjects.principal("cli", "alice"), "task_submitted")
        n = 0
        while not stop.is_set():
            n += 1
            event = TaskSubmitted(id=new_id(), task_id=f"c{n}", skill="echo", input={"n": n})
            while True:  # also after stop: a task is never left half-sent
                try:
                    await js.publish(subject, codec.encode(event), headers={subjects.HDR_MSG_ID: event.id})
                    break
                except (nats.errors.Error, TimeoutError):
                    self.failed_attempts += 1
                    await asyncio.sleep(0.05)
            self.acked[event.task_id] = time.monotonic()
            await asyncio.sleep(self.interval)

    def times(self, since: float, until: float = float("inf")) -> list[float]:
        return sorted(t for t in self.acked.values() if since <= t <= until)

    def longest_gap(self, since: float, until: float) -> tuple[float, float]:
        """The longest wait between PubAcks from ``since`` to ``until`` (either end counts),
        and when, after ``since``, the PubAck that ended it came: when writes resumed."""
        times = [since, *self.times(since, until), until]
        gap, end = max((b - a, b) for a, b in itertools.pairwise(times))
        return gap, end - since

    async def acks_after(self, since: float, count: int, timeout: float = 30.0) -> None:
        """Wait for ``count`` PubAcks after ``since``."""

        async def enough() -> bool:
            return len(self.times(since)) >= count

        await wait_until(enough, timeout, what=f"{count} PubAcks")


async def move_leader(admin: Client, js: JetStreamContext, cluster: NatsCluster, stream: str, node: str) -> None:
    """Ask ``stream``'s leader to step down in favour of ``node`` until ``node`` leads it."""
    request = json.dumps({"placement": {"preferred": cluster.server_names[node]}}).encode()

    async def leads() -> bool:
        try:
            if await cluster.stream_leader(js, stream) == node:
                return True
            await admin.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=2)
        except (nats.errors.Error, TimeoutError):
            pass  # between leaders
        return False

    await wait_until(leads, 30, what=f"{node} leading {stream}")


async def elected(js: JetStreamContext, cluster: NatsCluster, stream: str, dead: str, since: float) -> float:
    """Seconds from ``since`` until ``stream`` reports a leader other than ``dead``."""
    async with asyncio.timeout(60):
        while True:
            try:
                if await cluster.stream_leader(js, stream) not in (None, dead):
                    return time.monotonic() - since
            except (nats.errors.Error, TimeoutError):
                pass  # no leader to answer yet
            await asyncio.sleep(0.05)


def test_each_shipped_node_routes_to_the_other_two_syncs_every_write_and_uses_the_repos_users() -> None:
    names = set()
    for node in NODES:
        config = REPO / "nats-cluster" / f"{node}.conf"
        text = config.read_text()
        routes = {int(port) for port in re.findall(r"nats-route://127\.0\.0\.1:(\d+)", text)}
        assert routes == {SHIPPED_CLUSTER_PORTS[n] for n in NODES if n != node}
        assert f"listen: 127.0.0.1:{SHIPPED_CLIENT_PORTS[node]}" in text
        assert re.search(r"^\s*sync_interval:\s*always\s*$", text, re.MULTILINE)
        assert users_dir(config) == REPO / "var" / "auth"  # where `agentctl nats --node` writes them
        names.add(re.findall(r"^server_name:\s*(\S+)", text, re.MULTILINE)[0])
    assert len(names) == len(NODES)


def test_provisioning_waits_out_a_forming_cluster_but_not_a_configuration_it_cannot_have() -> None:
    assert transient(nats.js.errors.ServiceUnavailableError())  # no meta leader yet
    assert transient(nats.js.errors.BadRequestError(err_code=10005))  # a node not yet known online
    assert transient(nats.errors.TimeoutError())
    assert not transient(nats.js.errors.ServerError(err_code=10074))  # R3 on one server
    assert not transient(nats.js.errors.BadRequestError(err_code=STREAM_NAME_IN_USE))  # updated instead


async def test_three_replicas_on_one_server_fail_naming_the_setting(nats_server: NatsServer) -> None:
    assert nats_server.config is not None
    settings = Settings(url=nats_server.url, auth_dir=auth_dir(nats_server.config), stream_replicas=3)
    nc = await connect(settings, "router")
    try:
        with pytest.raises(BusError, match="LEDGERBUS_STREAM_REPLICAS=3 needs a JetStream cluster"):
            await provision(nc.jetstream(), settings)
    finally:
        await nc.close()


async def test_streams_and_buckets_made_with_one_replica_get_three_when_the_router_starts_with_three(
    cluster: NatsCluster, settings: Settings, connect_as: Connect
) -> None:
    js = (await connect_as("router")).jetstream(timeout=5)  # the router's own permissions suffice
    one = settings.replace(stream_replicas=1)
    await provision(js, one)
    await Lease(js, 3).bucket()
    await provision(js, settings)
    await Lease(js, 3, replicas=3).bucket()
    streams = [subjects.INGRESS_STREAM, subjects.AUDIT_STREAM, subjects.WORK_STREAM, subjects.DEADLETTER_STREAM,
               subjects.TRACES_STREAM, f"KV_{subjects.AGENTS_BUCKET}", f"KV_{subjects.ROUTER_BUCKET}",
               subjects.kv_stream(subjects.CHAIN_BUCKET), subjects.obj_stream(subjects.SNAPSHOT_BUCKET),
               subjects.obj_stream(subjects.PROJECTION_BUCKET)]
    assert {s: (await js.stream_info(s)).config.num_replicas for s in streams} == dict.fromkeys(streams, 3)
    await cluster.wait_current(js, streams)  # and the two new copies of each exist


async def retried(read: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """``read()``, again if it fails: for a while after a node dies, creating a reader's
    consumer may time out."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await read()
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.1)


async def completed(js: JetStreamContext, task_ids: list[str], timeout: float = 60.0) -> Counter[str]:
    """Accepted completions per task, once every task has one."""
    wanted = set(task_ids)
    counts: Counter[str] = Counter()

    async def done() -> bool:
        records = [codec.decode_record(data) for _, data in await retried(lambda: stored_audit(js))]
        counts.clear()
        counts.update(r.key for r in records if r.accepted and r.kind == "task_completed" and r.key in wanted)
        return wanted <= counts.keys()

    await wait_until(done, timeout, what="every acknowledged task completed")
    return counts


async def test_a_cluster_loses_no_acknowledged_write_when_the_stream_leader_then_a_follower_dies(
    cluster: NatsCluster, procs: Procs, settings: Settings, connect_as: Connect, admin: Client
) -> None:
    js = admin.jetstream(timeout=2)
    victim = await cluster.stream_leader(js, subjects.AUDIT_STREAM)
    assert victim is not None
    await move_leader(admin, js, cluster, subjects.INGRESS_STREAM, victim)

    await procs.start("router-a", "router", **ROUTER_ENV)
    await procs.start("router-b", "router", **ROUTER_ENV)
    await procs.start("projector", "projector")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "4")
    await wait_for_record(js, joined("echo-1"))

    publisher = Publisher(await connect_as("cli"))
    stop = asyncio.Event()
    publishing = asyncio.create_task(publisher.run(stop))
    await publisher.acks_after(0, 50)

    # The leader of INGRESS and AUDIT dies; watch the elections from the other two nodes.
    meta_before = cluster.meta_leader()
    watcher = await connect(settings.replace(url=cluster.urls(without=victim)), "admin")
    try:
        wjs = watcher.jetstream(timeout=0.5)
        killed = time.monotonic()
        await cluster.kill(victim)
        elections = {s: await elected(wjs, cluster, s, victim, killed)
                     for s in (subjects.INGRESS_STREAM, subjects.AUDIT_STREAM)}
        await publisher.acks_after(killed, 25)
        await cluster.restart(victim)
        restarted = time.monotonic()
        await cluster.wait_current(wjs, STREAMS)
        caught_up = time.monotonic() - restarted
        leaders = {await cluster.stream_leader(wjs, s) for s in (subjects.INGRESS_STREAM, subjects.AUDIT_STREAM)}
    finally:
        await watcher.close()
    leader_phase_end = time.monotonic()

    # A follower of both streams dies: the meta leader too only if no other node is free.
    followers = [n for n in NODES if n not in leaders]
    follower = next((n for n in followers if n != cluster.meta_leader()), followers[0])
    follower_killed = time.monotonic()
    await cluster.kill(follower)
    await publisher.acks_after(follower_killed, 50)
    stop.set()
    await publishing
    ended = time.monotonic()
    counts = await completed(js, list(publisher.acked))
    assert set(counts.values()) == {1}, {k: n for k, n in counts.items() if n != 1}
    stored = await retried(lambda: stored_audit(js))
    assert chain.verify(stored).seq == len(stored)  # raises naming the first record out of place
    audit = (await retried(lambda: js.stream_info(subjects.AUDIT_STREAM))).state

    async def projected() -> bool:
        return bool((await query.ask(admin, "projections", "digest", {}))["position"] >= audit.last_seq)

    await wait_until(projected, 30, what=f"the projector at seq {audit.last_seq}")
    live = await query.ask(admin, "projections", "digest", {})
    check = await retried(lambda: compare_digest(js, live["position"], live["digest"], live.get("memory_list_cap")))
    assert check.ok, check.detail

    leader_gap, resumed = publisher.longest_gap(killed, leader_phase_end)
    follower_gap, _ = publisher.longest_gap(follower_killed, ended)
    report: dict[str, Any] = {
        "killed_leader": cluster.server_names[victim],
        "killed_leader_was_meta_leader": meta_before == victim,
        "election_s": elections,
        "writes_resumed_after_kill_s": resumed,
        "longest_puback_gap_s": {"leader_killed": leader_gap, "follower_killed": follower_gap},
        "restarted_node_caught_up_s": caught_up,
        "killed_follower": cluster.server_names[follower],
        "tasks_acknowledged": len(publisher.acked),
        "tasks_completed_once": sum(1 for n in counts.values() if n == 1),
        "failed_publish_attempts": publisher.failed_attempts,
        "audit_bytes_per_record": audit.bytes // max(audit.messages, 1),
    }
    print(json.dumps(report, indent=2))
    if path := os.environ.get("LEDGERBUS_CLUSTER_REPORT"):
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
