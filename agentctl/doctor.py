"""``agentctl doctor``: is this machine ready to run ledgerbus, and how is it set up?

Each check says ok, warn (works, but not as well as it could) or fail (something a
process will refuse to start with). Nothing here changes anything; keys are never shown,
only whether the variable that should hold one is set.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import click
from rich.table import Table

from ledgerbus.agentctl.common import EXIT_FAILED, App, cli_principal, out
from ledgerbus.bus.errors import LedgerbusError

Level = Literal["ok", "warn", "fail"]
STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


@dataclass
class Finding:
    """One check's outcome."""

    check: str
    level: Level
    detail: str
    data: Any = None


def _server() -> Finding:
    from ledgerbus.bus.server import nats_server_binary

    try:
        return Finding("nats-server", "ok", str(nats_server_binary()))
    except LedgerbusError as exc:
        return Finding("nats-server", "fail", str(exc))


async def _bus(app: App) -> Finding:
    from ledgerbus.bus.connection import connected

    settings = app.settings.replace(connect_timeout_s=min(app.settings.connect_timeout_s, 3.0))
    try:
        async with connected(settings, cli_principal()):
            return Finding("bus", "ok", f"connected to {settings.url} as {cli_principal()}")
    except (LedgerbusError, OSError, TimeoutError) as exc:
        return Finding("bus", "warn", f"{settings.url}: {exc} (start it with `honcho start`)")


def _policy(app: App) -> list[Finding]:
    from ledgerbus.agents import hooks, isolation, sandbox
    from ledgerbus.router.policy import load

    path = app.settings.policy_path
    findings = []
    if not path.exists():
        findings.append(Finding("policy", "warn", f"{path} is missing: built-in defaults apply"))
    else:
        try:
            load(path)
            findings.append(Finding("policy", "ok", str(path)))
        except LedgerbusError as exc:
            return [Finding("policy", "fail", str(exc))]
    try:
        found = isolation.describe(sandbox.load_policy(path))
    except LedgerbusError as exc:
        findings.append(Finding("sandbox", "fail", str(exc)))
    else:
        if found["isolation"] is None:
            findings.append(Finding("sandbox", "fail", found["error"], found))
        elif found["isolation"] == "bwrap":
            findings.append(Finding("sandbox", "ok", f"bwrap {found['bwrap']['version'] or ''}: no network, read-only "
                                    "root, only the workspace writable; rlimits", found))
        else:
            why = found["bwrap"]["reason"] or "policy asks for rlimits"
            findings.append(Finding("sandbox", "warn", f"rlimits only ({why}); install bubblewrap for filesystem and "
                                    "network isolation", found))
    try:
        loaded = hooks.Hooks.load(path)
        findings.append(Finding("hooks", "ok", ", ".join(loaded.names) or "none"))
    except LedgerbusError as exc:
        findings.append(Finding("hooks", "fail", str(exc)))
    return findings


def _llm(app: App) -> list[Finding]:
    from ledgerbus.agents.llm import config

    path = app.settings.llm_config_path
    try:
        routing = config.load(path)
    except LedgerbusError as exc:
        return [Finding("llm routing", "fail", str(exc))]
    if routing is None:
        return [Finding("llm routing", "warn", f"{path} is missing: LLM skills (llm.chat, plan, reason) fail until "
                        "it exists (`agentctl init` writes one)")]
    findings = [Finding("llm routing", "ok", f"{path}: {len(routing.providers)} providers, "
                        f"{len(routing.skills)} skill and {len(routing.roles)} role routes")]
    from ledgerbus.agents.llm.openai_compat import OPENAI_BASE_URL, needs_key

    for name, provider in sorted(routing.providers.items()):
        if provider.type == "scripted":
            findings.append(Finding(f"llm provider {name}", "warn", f"scripted: {len(provider.answers or [])} canned "
                                    "answers, not a model (for tests and demos)"))
            continue
        if provider.type == "replay":
            findings.append(Finding(f"llm provider {name}", "ok", f"replay: answers from the recording {provider.file}, "
                                    "not a model"))
            continue
        env = provider.key_env()
        has_key = bool(os.environ.get(env))
        address = provider.base_url or (OPENAI_BASE_URL if provider.type in ("openai", "vllm") else "")
        required = provider.type == "anthropic" or (provider.type != "anthropic" and needs_key(address))
        level: Level = "ok" if has_key or not required else "warn"
        where = address or "the SDK's default address"
        findings.append(Finding(f"llm provider {name}", level,
                                f"{provider.type} at {where}; {env} is {'set' if has_key else 'not set'}"
                                + ("" if has_key or not required else
                                   ": calls fall through to the route's next provider")))
    return findings


def _project(app: App) -> Finding:
    from ledgerbus.bus.home import MARKERS, outside_hint

    if app.settings.home is None:
        return Finding("project", "warn", f"none found from {Path.cwd()}{outside_hint(None)}")
    return Finding("project", "ok", f"{app.settings.home} ({' and '.join(MARKERS)} found there)")


def _skills() -> list[Finding]:
    from ledgerbus.agents import discovery

    available = discovery.available()
    loaded = discovery.catalog()
    findings = [Finding("skills", "ok", ", ".join(loaded) or "none")]
    for name in sorted(set(available) - set(loaded)):
        findings.append(Finding(f"skill {name}", "fail", f"{available[name].value} does not import (see the log)"))
    return findings


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def doctor(app: App, as_json: bool) -> None:
    """Check this installation: nats-server, the bus, policy, sandbox isolation, hooks,
    LLM routing and keys, skills. Exits 1 if a check fails."""
    findings = [_project(app), _server(), asyncio.run(_bus(app)), *_policy(app), *_llm(app), *_skills()]
    if as_json:
        out.print_json(data=[asdict(f) for f in findings])
    else:
        table = Table("check", "", "detail", box=None)
        for f in findings:
            table.add_row(f.check, f"[{STYLE[f.level]}]{f.level}[/]", f.detail)
        out.print(table)
    if any(f.level == "fail" for f in findings):
        raise SystemExit(EXIT_FAILED)
