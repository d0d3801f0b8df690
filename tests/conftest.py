"""Fixtures: a real nats-server per test (from the wheel, the repo's nats.conf, --port -1,
a temporary store), settings pointing at it, and connections as each principal."""

from __future__ import annotations

import asyncio
import compileall
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.bus.connection import connect
from ledgerbus.bus.provision import provision
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from ledgerbus.router.app import Router
from tests.support import Procs, auth_dir, server_config, suite_settings

def pytest_configure(config: pytest.Config) -> None:
    """Compile the project's own modules once, before the workers start.

    The suite starts a few hundred Python processes (routers, agents, projectors, agentctl
    calls); where PYTHONDONTWRITEBYTECODE is set, as on CI's machines, each would compile
    the project's sources again (the installed packages are compiled at install: pyproject's
    ``compile-bytecode``). ``py_compile`` writes the ``.pyc`` files whatever that says.
    """
    if hasattr(config, "workerinput"):
        return
    package = Path(__file__).resolve().parent.parent / "ledgerbus"
    # compileall skips symlinked directories: ledgerbus/<name> point at the top-level ones.
    for tree in [package, *(link.resolve() for link in package.iterdir() if link.is_symlink() and link.is_dir())]:
        compileall.compile_dir(tree, quiet=1, workers=0)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A fresh JetStream server with the project's own nats.conf and test identities."""
    async with NatsServer(store_dir=tmp_path / "jetstream", config=server_config(tmp_path / "conf")) as server:
        yield server


@pytest.fixture
def workspace_root() -> Iterator[Path]:
    """Where agents make task workspaces: a fresh directory the sandbox user can reach
    (pytest's own temp dirs are private to root, and sandboxed commands run as nobody)."""
    root = Path(tempfile.mkdtemp(prefix="ledgerbus-workspaces-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path, workspace_root: Path) -> Settings:
    """Settings for the test's server, with short timers so redelivery tests run fast."""
    return suite_settings(nats_server.url, tmp_path, workspace_root,
                          auth_dir(nats_server.config) if nats_server.config else tmp_path)


@pytest.fixture
async def connect_as(settings: Settings) -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    """``await connect_as("agent-a1")``: a connection as that principal, closed after.

    ``"cli"`` and ``"agent"`` connect as the test harness users that may speak as any
    principal of that kind (see tests/support.py).
    """
    conns: list[Client] = []

    async def factory(principal: str) -> Client:
        if principal in ("cli", "agent"):
            user = f"harness-{principal}"
            nc = await connect(settings.replace(user=user, password=f"{user}-pw"), principal)
        else:
            nc = await connect(settings, principal)
        conns.append(nc)
        return nc

    yield factory
    for nc in conns:
        if not nc.is_closed:
            await nc.close()


@pytest.fixture
async def admin(connect_as: Callable[[str], Awaitable[Client]], settings: Settings) -> Client:
    """An admin connection, with the streams provisioned."""
    nc = await connect_as("admin")
    await provision(nc.jetstream(), settings)
    return nc


class RunningRouter:
    """A router served in this test's event loop, stoppable and restartable."""

    def __init__(self, nc: Client, settings: Settings) -> None:
        self.nc = nc
        self.settings = settings
        self.router: Router | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Router:
        self.router = Router(self.nc, self.settings)
        await self.router.start()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.router.run(self._stop))
        return self.router

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None


@pytest.fixture
async def running_router(connect_as: Callable[[str], Awaitable[Client]], settings: Settings) -> AsyncIterator[RunningRouter]:
    """A router connected as the router user, already serving."""
    rr = RunningRouter(await connect_as("router"), settings)
    await rr.start()
    yield rr
    await rr.stop()


@pytest.fixture
async def procs(settings: Settings, tmp_path: Path) -> AsyncIterator[Procs]:
    """Start agentctl subprocesses; all are stopped at teardown."""
    p = Procs(settings, tmp_path)
    yield p
    await p.stop_all()
