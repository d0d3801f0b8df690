"""What every command shares: settings from options and env, running async code, errors."""

from __future__ import annotations

import asyncio
import getpass
import re
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
import nats.errors
from rich.console import Console

from ledgerbus.bus.errors import LedgerbusError
from ledgerbus.bus.settings import Settings

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_BUS = 3

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


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
    except LedgerbusError as exc:
        fail(str(exc))
    except nats.errors.Error as exc:
        fail(f"NATS: {exc or type(exc).__name__}")
    except KeyboardInterrupt:
        fail("interrupted", 130)


def cli_principal() -> str:
    """The principal (and NATS user) this CLI acts as: ``cli-<name>``."""
    return f"cli-{cli_name()}"


def cli_name() -> str:
    """The name this CLI user acts as: ``LEDGERBUS_CLI_NAME`` or the login name, made safe."""
    import os

    raw = os.environ.get("LEDGERBUS_CLI_NAME") or getpass.getuser() or "user"
    name = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")[:48]
    return name or "user"
