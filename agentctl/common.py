"""What every command shares: settings from options and env, running async code, errors."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import nats.errors
from rich.console import Console

from ledgerbus.bus.errors import LedgerbusError, NotFound
from ledgerbus.bus.identity import cli_name
from ledgerbus.bus.settings import Settings

if TYPE_CHECKING:
    from ledgerbus.client import Bus

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_BUS = 3

def _width(stream: Any) -> int | None:
    """Piped, rich would assume 80 columns, squeeze tables and wrap lines: a script or a log
    gets whole lines (``COLUMNS`` still wins)."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 1000


out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, width=_width(sys.stderr))


@dataclass
class App:
    """The click context object: settings plus what the top-level options said."""

    settings: Settings
    log_format: str
    log_level: str


def fail(message: str, code: int = EXIT_BUS) -> NoReturn:
    """Print ``agentctl: message`` on stderr and exit with ``code``."""
    click.echo(f"agentctl: {message}", err=True)
    sys.exit(code)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async command body, turning known errors into one-line messages."""
    try:
        return asyncio.run(coro_fn())
    except NotFound as exc:  # an id (or prefix) nobody knows is bad usage, not a bus failure
        fail(str(exc), EXIT_TIMEOUT)
    except LedgerbusError as exc:
        fail(str(exc))
    except nats.errors.Error as exc:
        fail(f"NATS: {exc or type(exc).__name__}")
    except KeyboardInterrupt:
        fail("interrupted", 130)


@asynccontextmanager
async def open_bus(app: App, db_path: Path | None = None) -> AsyncIterator[Bus]:
    """The client (:mod:`ledgerbus.client`) every command works through, as this CLI user;
    with ``db_path`` it reads that projection file instead of asking the projector."""
    from ledgerbus.client import connect

    async with connect(settings=app.settings, db=db_path, span_name="agentctl.submit",
                       client_name=f"agentctl-{cli_name()}") as bus:
        yield bus


def cli_principal() -> str:
    """The principal (and NATS user) this CLI acts as: ``cli-<name>``."""
    return f"cli-{cli_name()}"


async def projected(bus: Bus, task_id: str, status: str, within: float = 15.0) -> dict[str, Any]:
    """The task as the projection shows it once it has caught up with the log, which has
    the task ``status`` (the projector is a batch behind the log, and there is no event to
    wait on); after ``within`` seconds, as it shows it then."""
    delay = 0.02
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            task: dict[str, Any] = await bus.get(task_id, tree=False)
        except NotFound:
            task = {"status": "not projected yet"}
        if task["status"] == status or loop.time() >= deadline:
            return task
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)
