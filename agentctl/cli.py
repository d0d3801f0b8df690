"""The ``agentctl`` command group and its shared options."""

from __future__ import annotations

import importlib
import os

import click

from ledgerbus.agentctl.common import App, fail
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.logs import configure_logging
from ledgerbus.bus.settings import Settings

PROCESSES = ("nats", "router", "projector", "agent", "web")

COMMANDS: dict[str, str] = {
    "nats": "ledgerbus.agentctl.processes:nats", "router": "ledgerbus.agentctl.processes:router",
    "projector": "ledgerbus.agentctl.processes:projector", "agent": "ledgerbus.agentctl.processes:agent",
    "submit": "ledgerbus.agentctl.submit:submit", "cancel": "ledgerbus.agentctl.submit:cancel",
    "approve": "ledgerbus.agentctl.approvals:approve", "deny": "ledgerbus.agentctl.approvals:deny",
    "approvals": "ledgerbus.agentctl.approvals:approvals", "tasks": "ledgerbus.agentctl.reads:tasks", "events": "ledgerbus.agentctl.reads:events",
    "agents": "ledgerbus.agentctl.reads:agents", "match": "ledgerbus.agentctl.match:match", "memory": "ledgerbus.agentctl.memory:memory",
    "checkpoint": "ledgerbus.agentctl.memory:checkpoint", "shared": "ledgerbus.agentctl.memory:shared", "audit": "ledgerbus.agentctl.audit:audit",
    "keys": "ledgerbus.agentctl.keys:keys", "replay": "ledgerbus.agentctl.replay:replay", "snapshot": "ledgerbus.agentctl.replay:snapshot",
    "skills": "ledgerbus.agentctl.skills:skills", "usage": "ledgerbus.agentctl.usage:usage", "doctor": "ledgerbus.agentctl.doctor:doctor",
    "top": "ledgerbus.agentctl.top:top", "init": "ledgerbus.agentctl.init:init",
    "web": "ledgerbus.agentctl.web:web", "trace": "ledgerbus.agentctl.traces:trace_cmd",
    "archive": "ledgerbus.agentctl.archive:archive",
    "llm": "ledgerbus.agentctl.llm:llm", "fork": "ledgerbus.agentctl.fork:fork",
    "demo": "ledgerbus.agentctl.demo:demo",
}
"""Every command, and where it lives: a command's module is imported only when it runs
(or for ``--help``), so ``agentctl tasks`` does not pay for ``replay``'s imports."""


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (click's documented pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--url", envvar="LEDGERBUS_URL", help="NATS server URL(s), comma-separated. [env LEDGERBUS_URL]")
@click.option("--user", envvar="LEDGERBUS_USER", help="NATS user (default: the command's role). [env LEDGERBUS_USER]")
@click.option("--password", envvar="LEDGERBUS_PASSWORD", help="NATS password. [env LEDGERBUS_PASSWORD]")
@click.option("--log-format", envvar="LEDGERBUS_LOG_FORMAT", type=click.Choice(["console", "json"]),
              default="console", show_default=True)
@click.option("--log-level", envvar="LEDGERBUS_LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
              help="[default: info for processes, warning for commands]")
@click.version_option(package_name="ledgerbus")
@click.pass_context
def cli(ctx: click.Context, url: str | None, user: str | None, password: str | None, log_format: str,
        log_level: str | None) -> None:
    """ledgerbus: an event-sourced message bus for multi-agent systems.

    Exit codes: 0 ok; 1 task failed or rejected; 2 timeout or bad usage; 3 the bus or a
    setting failed.
    """
    try:
        settings = Settings.from_env().replace(url=url, user=user, password=password)
    except ConfigError as exc:
        fail(str(exc))
    is_process = ctx.invoked_subcommand in PROCESSES
    if log_level is None:
        log_level = "info" if is_process else "warning"
    if not is_process and "LEDGERBUS_CONNECT_TIMEOUT_S" not in os.environ:
        # A person at a terminal should hear within seconds that the bus is not there.
        settings = settings.replace(connect_timeout_s=min(settings.connect_timeout_s, 5.0))
    # Logs go to stderr, so stdout stays clean for --json.
    configure_logging(log_format, log_level)
    ctx.obj = App(settings=settings, log_format=log_format, log_level=log_level)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="agentctl")
