"""The README documents every agentctl command and every setting (a meta-test, as datasette has)."""

from __future__ import annotations

import dataclasses

import click

from ledgerbus.agentctl.cli import cli
from ledgerbus.bus.settings import Settings
from tests.support import REPO

README = (REPO / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "agentctl") -> list[str]:
    names = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        assert command.name == name or name == "trace", f"{name} loads command {command.name}"
        names.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            names += _commands(command, f"{prefix} {name}")
    return names


def test_every_command_is_in_the_readme_cli_table() -> None:
    missing = [c for c in _commands(cli) if f"`{c}" not in README]
    assert not missing, f"document these in README.md: {missing}"


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    missing = [f"LEDGERBUS_{f.name.upper()}" for f in dataclasses.fields(Settings)
               if f"LEDGERBUS_{f.name.upper()}" not in README]
    assert not missing, f"document these in README.md: {missing}"
