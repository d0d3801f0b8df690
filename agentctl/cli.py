"""The ``agentctl`` command group and its shared options."""

from __future__ import annotations

import os

import click

from agentctl.approvals import approvals, approve, deny
from agentctl.audit import audit
from agentctl.common import App, fail
from agentctl.doctor import doctor
from agentctl.keys import keys
from agentctl.match import match
from agentctl.memory import checkpoint, memory, shared
from agentctl.processes import agent, nats, projector, router
from agentctl.reads import agents, events, tasks
from agentctl.replay import replay, snapshot
from agentctl.skills import skills
from agentctl.submit import cancel, submit
from agentctl.top import top
from agentctl.traces import trace_cmd
from agentctl.usage import usage
from bus.errors import ConfigError
from bus.logs import configure_logging
from bus.settings import Settings

PROCESSES = ("nats", "router", "projector", "agent")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


for command in (nats, router, projector, agent, submit, cancel, approve, deny, approvals, tasks, events, agents, memory,
                checkpoint, shared, audit, keys, replay, snapshot, skills, usage, doctor, top, trace_cmd, match):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="agentctl")
