"""What fsyncing every write costs: publish throughput and PubAck latency with JetStream's
``sync_interval`` as it is by default and set to ``always``, on one server and on the
three-node cluster of ``nats-cluster/``.

Four configurations, on fresh servers in every round (the order alternates between rounds):

- one server with the project's ``nats.conf``: the default ``sync_interval`` (2 minutes:
  a write is acknowledged once it is in the OS page cache, and fsynced later);
- the same with ``sync_interval: always`` (fsync before each acknowledgement);
- the cluster's three nodes on loopback, streams at three replicas, with
  ``sync_interval: 2m`` (the default, spelled out in place of the shipped setting);
- the cluster as shipped, ``sync_interval: always``.

Each publishes ``messages`` ``TaskSubmitted`` to INGRESS as a CLI user does, pipelined
(throughput: messages over the time to the last PubAck), then ``sequential`` more one at a
time (the median PubAck round trip). The client is given every node's URL and connects to
one at random, as the processes do, so it may or may not sit on the stream's leader. The
ratios are against one server with the default setting, medians of rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.cluster import NatsCluster
from ledgerbus.bus.connection import connect
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.identity import Identity, write_local_config
from ledgerbus.bus.provision import provision
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings

CLI = subjects.principal("cli", "bench")
CONFIGS = ("single-default", "single-always", "cluster-default", "cluster-always")
DEFAULT_SYNC = "2m"
"""nats-server's own default for ``sync_interval``."""


async def _publish(settings: Settings, messages: int, sequential: int) -> tuple[float, float]:
    """Messages/s pipelined, and the median PubAck round trip (s) one at a time."""
    admin = await connect(settings, "admin")
    await provision(admin.jetstream(timeout=10), settings)
    await admin.close()
    cli = await connect(settings, CLI.token)
    js = cli.jetstream(timeout=10)
    subject = subjects.ingress(CLI, "task_submitted")

    def payload(i: int) -> bytes:
        return codec.encode(TaskSubmitted(id=new_id(), task_id=f"t{i}", skill="echo", input={"i": i, "text": "hello"}))

    await js.publish(subject, payload(-1))  # the stream leader is known and the route warm
    start = time.perf_counter()
    publisher = await Publisher(cli).start()
    acks = await publisher.publish([(subject, payload(i), None) for i in range(messages)])
    failed = [a for a in acks if isinstance(a, BaseException)]
    elapsed = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"{len(failed)} of {messages} publishes failed: {failed[0]}")
    rtts = []
    for i in range(sequential):
        data = payload(messages + i)
        t = time.perf_counter()
        await js.publish(subject, data)
        rtts.append(time.perf_counter() - t)
    await cli.close()
    return messages / elapsed, statistics.median(rtts)


async def _single(tmp: Path, principals: list[Identity], repo: Path, always: bool,
                  body: Callable[[Settings], Awaitable[tuple[float, float]]]) -> tuple[float, float]:
    config = write_local_config(tmp / "conf", repo / "nats.conf", principals)
    if always:
        text = config.read_text()
        if "jetstream {\n" not in text:
            raise RuntimeError("nats.conf has no jetstream block to add sync_interval to")
        config.write_text(text.replace("jetstream {\n", "jetstream {\n  sync_interval: always\n", 1))
    async with NatsServer(tmp / "js", config=config) as server:
        return await body(Settings(url=server.url, auth_dir=config.parent / "var" / "auth", connect_timeout_s=10))


async def _cluster(tmp: Path, principals: list[Identity], repo: Path, always: bool,
                   body: Callable[[Settings], Awaitable[tuple[float, float]]]) -> tuple[float, float]:
    sync = None if always else DEFAULT_SYNC  # None: as shipped, always
    async with NatsCluster(tmp, repo / "nats-cluster", principals, sync_interval=sync) as cluster:
        return await body(Settings(url=cluster.url, auth_dir=cluster.auth_dir, connect_timeout_s=10,
                                   stream_replicas=3))


async def run(messages: int, sequential: int, rounds: int, principals: list[Identity], repo: Path,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every configuration ``rounds`` times; medians, and ratios to one server by default."""
    rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
    rtts: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(rounds):
        for name in CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS)):
            kind, sync = name.split("-")
            with tempfile.TemporaryDirectory() as tmp:
                start = _single if kind == "single" else _cluster
                rate, rtt = await start(Path(tmp), principals, repo, sync == "always",
                                        lambda s: _publish(s, messages, sequential))
            rates[name].append(rate)
            rtts[name].append(rtt)
            say(f"round {r + 1}/{rounds}: {name:<16} {rate:>9,.0f} msg/s  PubAck p50 {rtt * 1000:6.2f} ms")
    base_rate = statistics.median(rates["single-default"])
    base_rtt = statistics.median(rtts["single-default"])
    return {
        "messages": messages,
        "sequential": sequential,
        "rounds": rounds,
        "msgs_per_s": {c: statistics.median(v) for c, v in rates.items()},
        "puback_ms_p50": {c: statistics.median(v) * 1000 for c, v in rtts.items()},
        "throughput_over_single_default": {c: statistics.median(v) / base_rate for c, v in rates.items()},
        "puback_over_single_default": {c: statistics.median(v) / base_rtt for c, v in rtts.items()},
        "rounds_msgs_per_s": rates,
        "rounds_puback_ms": {c: [x * 1000 for x in v] for c, v in rtts.items()},
    }
