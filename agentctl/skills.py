"""``agentctl skills``: what this installation's agents can run, with input and output schemas."""

from __future__ import annotations

import json

import click
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

from ledgerbus.agentctl.common import EXIT_FAILED, fail, out
from ledgerbus.agentctl.complete import skill_names
from ledgerbus.agents import discovery, hooks


@click.command()
@click.argument("name", required=False, shell_complete=skill_names)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def skills(name: str | None, as_json: bool) -> None:
    """List the installed skills (entry-point group ledgerbus.skills) and hooks, or show
    skill NAME with its input and output JSON schemas."""
    found = {n: info.describe() for n, info in discovery.catalog().items()}
    if name is not None:
        if name not in found:
            fail(f"no installed skill named {name!r} (installed: {', '.join(found) or 'none'})", EXIT_FAILED)
        if as_json:
            out.print_json(data=found[name])
            return
        _show(found[name])
        return
    loaded_hooks = [{"name": getattr(h, "name", "?"), "skills": list(getattr(h, "skills", ("*",))),
                     "stages": [s for s in ("before", "after") if hasattr(h, s)]} for h in hooks.plugins()]
    if as_json:
        out.print_json(data={"skills": list(found.values()), "hooks": loaded_hooks})
        return
    table = Table("skill", "description", "capabilities", "input fields", box=None)
    for info in found.values():
        fields = sorted((info["input"] or {}).get("$defs", {}).get(_ref(info["input"]), {}).get("properties", {}))
        table.add_row(info["name"], info["description"], ", ".join(info["capabilities"]),
                      ", ".join(fields) if info["input"] else "[dim]any object[/]")
    out.print(table if found else "[dim]no skills installed[/]")
    out.print("[dim]agentctl skills NAME: its schemas and where it comes from[/]")
    if loaded_hooks:
        out.print()
        hooks_table = Table("hook", "skills", "stages", box=None)
        for h in loaded_hooks:
            hooks_table.add_row(str(h["name"]), ", ".join(h["skills"]), ", ".join(h["stages"]))
        out.print(hooks_table)


def _ref(schema: dict | None) -> str:
    """The name of the definition a msgspec schema's top-level ``$ref`` points at."""
    ref = (schema or {}).get("$ref", "")
    return ref.rsplit("/", 1)[-1]


def _show(info: dict) -> None:
    tree = Tree(f"[bold]{info['name']}[/]  {info['description']}")
    tree.add(f"capabilities: {', '.join(info['capabilities']) or '-'}")
    tree.add(f"source: {info['source']}")
    for key in ("input", "output"):
        schema = info[key]
        if schema is None:
            tree.add(f"{key}: [dim]any JSON (undeclared)[/]")
        else:
            tree.add(f"{key} schema:").add(Syntax(json.dumps(schema, indent=2), "json", theme="ansi_dark"))
    out.print(tree)
