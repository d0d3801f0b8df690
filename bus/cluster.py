"""A three-node JetStream cluster on loopback, from the configurations in ``nats-cluster/``.

The tests and ``bench/`` run it; operators run the same files with ``agentctl nats --node``.
Each node's configuration is the shipped one with only its loopback ports moved to free
ones, so what runs is what ships: the routes, the cluster name, ``sync_interval`` and the
users file included from ``var/auth`` beside the node files. Ports are picked by binding
to port 0 rather than read from the server's log, because every node must know the
others' cluster ports before any of them starts.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import nats.errors
from nats.js import JetStreamContext

from ledgerbus.bus.connection import connected
from ledgerbus.bus.errors import ServerError
from ledgerbus.bus.identity import Identity, users_dir, write_users
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings

NODES = ("n1", "n2", "n3")
SHIPPED_CLIENT_PORTS = {"n1": 4222, "n2": 4223, "n3": 4224}
SHIPPED_CLUSTER_PORTS = {"n1": 6222, "n2": 6223, "n3": 6224}
_SERVER_NAME = re.compile(r"^\s*server_name\s*[:=]\s*(\S+)", re.MULTILINE)
_SYNC_INTERVAL = re.compile(r"^(\s*sync_interval\s*[:=]\s*)\S+", re.MULTILINE)
_ROUTES_LISTENING = "Listening for route connections"
_META_LEADER = re.compile(r"JetStream cluster new metadata leader: ([^/\s]+)")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nothing listens on now (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_config(text: str, ports: dict[int, int], sync_interval: str | None = None) -> str:
    """A shipped node configuration with its loopback ports replaced (``ports``: shipped →
    chosen), and ``sync_interval`` replaced when one is given; raises if the text does not
    have the shape this relies on, rather than run a cluster on the shipped ports."""
    missing = [old for old in ports if f"127.0.0.1:{old}" not in text]
    if missing:
        raise ServerError(f"node configuration has no 127.0.0.1:{missing[0]}: nats-cluster/ changed shape")
    text = re.sub(r"127\.0\.0\.1:(\d+)\b", lambda m: f"127.0.0.1:{ports.get(int(m.group(1)), int(m.group(1)))}", text)
    if sync_interval is not None:
        text, n = _SYNC_INTERVAL.subn(lambda m: m.group(1) + sync_interval, text)
        if n != 1:
            raise ServerError("node configuration has no sync_interval to replace")
    return text


class NatsCluster:
    """``async with NatsCluster(dir, repo / "nats-cluster", identities) as cluster``: three
    nats-servers on loopback, ready once JetStream has a meta leader every node reaches.

    ``identities`` (and ``extra_users``, verbatim) become the users file the nodes
    include; :attr:`auth_dir` holds their credentials. ``sync_interval`` replaces the
    shipped setting (the fsync benchmark compares the two).
    """

    def __init__(
        self,
        directory: Path,
        source: Path,
        identities: Iterable[Identity],
        extra_users: Iterable[dict[str, Any]] = (),
        sync_interval: str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.directory = directory
        self.source = source
        self.identities = list(identities)
        self.extra_users = list(extra_users)
        self.sync_interval = sync_interval
        self.ready_timeout = ready_timeout
        self.nodes: dict[str, NatsServer] = {}
        self.server_names: dict[str, str] = {}
        """Node (``n1``) → the ``server_name`` JetStream reports it by (stream leaders, peers)."""
        self.auth_dir = directory / "var" / "auth"

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (``LEDGERBUS_URL``)."""
        return ",".join(self.nodes[name].url for name in NODES)

    def urls(self, *, without: str | None = None) -> str:
        """The client URLs of every node but ``without``."""
        return ",".join(self.nodes[name].url for name in NODES if name != without)

    def node_of(self, server_name: str | None) -> str | None:
        """The node JetStream calls ``server_name`` (``None`` if none is)."""
        return next((node for node, sn in self.server_names.items() if sn == server_name), None)

    def write_configs(self) -> dict[str, tuple[Path, int]]:
        """Write each node's configuration and the users they include; each node's
        configuration path and client port."""
        chosen = free_ports(2 * len(NODES))
        client = dict(zip(NODES, chosen[: len(NODES)], strict=True))
        routes = {SHIPPED_CLUSTER_PORTS[n]: port for n, port in zip(NODES, chosen[len(NODES):], strict=True)}
        out = self.directory / self.source.name
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, tuple[Path, int]] = {}
        for name in NODES:
            text = (self.source / f"{name}.conf").read_text()
            if m := _SERVER_NAME.search(text):
                self.server_names[name] = m.group(1)
            config = out / f"{name}.conf"
            # A node names its own client port and every node's cluster port (its own, its routes).
            ports = {SHIPPED_CLIENT_PORTS[name]: client[name], **routes}
            config.write_text(node_config(text, ports, self.sync_interval))
            written[name] = (config, client[name])
        self.auth_dir = users_dir(written[NODES[0]][0])
        write_users(self.auth_dir, self.identities, self.extra_users)
        return written

    async def start(self, attempts: int = 3) -> Self:
        """Start the three nodes and wait until JetStream answers on every one. Should
        another process take one of the ports between picking and binding, start afresh
        on new ones."""
        attempt = 1
        while True:
            for name, (config, port) in self.write_configs().items():
                self.nodes[name] = NatsServer(self.directory / "store" / name, config=config, port=port)
            try:
                started = await asyncio.gather(*(node.start() for node in self.nodes.values()), return_exceptions=True)
                if failed := next((r for r in started if isinstance(r, BaseException)), None):
                    raise failed
                for node in self.nodes.values():
                    await node.wait_for_log(_ROUTES_LISTENING, self.ready_timeout)
                await self.wait_ready()
                return self
            except ServerError as exc:
                await self.stop()
                if "address already in use" not in str(exc) or attempt == attempts:
                    raise
                shutil.rmtree(self.directory / "store", ignore_errors=True)
                attempt += 1
            except BaseException:
                await self.stop()
                raise

    async def wait_ready(self, nodes: Iterable[str] = NODES) -> None:
        """Wait until each of ``nodes`` reaches a JetStream meta leader: its account info
        answers, which in a cluster takes one."""
        admin = next((i.user for i in self.identities if i.kind == "admin"), None)
        if admin is None:
            raise ServerError("a cluster needs an admin identity to see when it is ready")
        for name in nodes:
            settings = Settings(url=self.nodes[name].url, auth_dir=self.auth_dir, connect_timeout_s=self.ready_timeout)
            async with connected(settings, admin) as nc:
                js = nc.jetstream(timeout=1)
                try:
                    async with asyncio.timeout(self.ready_timeout):
                        while True:
                            try:
                                await js.account_info()
                                break
                            except (nats.errors.Error, TimeoutError):
                                await asyncio.sleep(0.1)
                except TimeoutError as exc:
                    raise ServerError(f"cluster node {name} has no JetStream meta leader after "
                                      f"{self.ready_timeout:g}s:\n" + "\n".join(self.nodes[name].log_tail)) from exc

    def meta_leader(self) -> str | None:
        """The node the running nodes last named as JetStream's meta leader in their logs
        (the API has no answer for that without a system account)."""
        latest: tuple[str, str] | None = None
        for node in self.nodes.values():
            if node.proc is None:
                continue
            for line in node.log_tail:
                if m := _META_LEADER.search(line):
                    # Log lines start with "[pid] date time": the latest time wins.
                    stamp = line.split("]", 1)[-1][:27]
                    if latest is None or stamp > latest[0]:
                        latest = (stamp, m.group(1))
        return self.node_of(latest[1]) if latest else None

    async def kill(self, name: str) -> None:
        """SIGKILL node ``name``: no clean shutdown, no leadership handed over."""
        await self.nodes[name].stop(signal.SIGKILL)

    async def restart(self, name: str) -> None:
        """Start node ``name`` again on its ports and store (after :meth:`kill`)."""
        await self.nodes[name].restart()

    async def stop(self) -> None:
        """Stop every node still running."""
        await asyncio.gather(*(node.stop() for node in self.nodes.values()))

    async def stream_leader(self, js: JetStreamContext, stream: str) -> str | None:
        """The node leading ``stream`` now, as JetStream reports it (``None`` during an election)."""
        info = await js.stream_info(stream)
        return self.node_of(info.cluster.leader if info.cluster else None)

    async def wait_current(self, js: JetStreamContext, streams: Iterable[str], timeout: float = 30.0) -> None:
        """Wait until every replica of every one of ``streams`` is online and current: a
        restarted node has caught up."""
        names = list(streams)

        async def current(stream: str) -> bool:
            info = await js.stream_info(stream)
            cluster = info.cluster
            if cluster is None or cluster.leader is None:
                return False
            peers = cluster.replicas or []
            wanted = (info.config.num_replicas or 1) - 1
            return len(peers) == wanted and all(p.current and not p.offline for p in peers)

        async with asyncio.timeout(timeout):
            while True:
                try:
                    if all([await current(s) for s in names]):
                        return
                except (nats.errors.Error, TimeoutError):
                    pass
                await asyncio.sleep(0.1)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
