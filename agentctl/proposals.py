"""``agentctl agents propose``: the agents the router proposed for plan steps (and, under
policy ``[tasks] unserved = "propose"``, submissions) that no live agent could serve, and
approving one.

When a step names capabilities no live agent offers, the router records ``skill_unmatched``
with a proposed agent (a name, skills, capabilities, instructions) and the step waits.
``--approve ID`` records ``proposal_approved`` through the router and, once the router
has accepted it, saves the proposal as a profile and makes the agent's identity (as
``agentctl keys add agent NAME --skills ...`` does, reloading the server). The profile goes
into the profiles file (permanent), or with ``--once`` into ``var/proposals/NAME.toml``,
for this run only. Its instructions are written by the LLM route for proposals
(``[skills.proposals]`` in ``llm.toml``, else its default route), from the step's needs;
with no route, or when the call fails (said in one line), the proposal's own template.
``--start`` then starts the agent (``agentctl agent --profile NAME``, detached, its log in
``var/log/agent-NAME.log``), and the waiting step runs on it; without it, start it so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.table import Column, Table

from ledgerbus.agentctl.common import EXIT_BUS, EXIT_FAILED, EXIT_TIMEOUT, App, err, fail, out, run
from ledgerbus.agentctl.keys import add_principal
from ledgerbus.agentctl.send import VERDICT_TIMEOUT_S, send
from ledgerbus.agents import profiles
from ledgerbus.bus import codec, subjects
from ledgerbus.bus.errors import LedgerbusError, NotFound, SchemaError
from ledgerbus.bus.events import ProposalApproved, new_id
from ledgerbus.bus.identity import Registry, identity


@click.command("propose")
@click.option("--approve", "proposal_id", metavar="ID",
              help="Approve proposal ID: save it as an agent profile and make the agent's identity.")
@click.option("--profile", "profile_name", metavar="NAME",
              help="With --approve: the name of the profile (and agent).  [default: the proposed name]")
@click.option("--pid-file", type=click.Path(dir_okay=False, path_type=Path), default=Path("var/nats.pid"),
              show_default=True, help="With --approve: a running nats-server to reload so the new agent may connect.")
@click.option("--once", is_flag=True,
              help="With --approve: for this run only: keep the profile in var/proposals/NAME.toml, not in the "
                   "profiles file.")
@click.option("--start", is_flag=True,
              help="With --approve: start the agent now (detached; its log in var/log/agent-NAME.log), so the "
                   "waiting step runs on it.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Read this projection database file instead of asking the projector.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def propose(app: App, proposal_id: str | None, profile_name: str | None, pid_file: Path, once: bool, start: bool,
            db_path: Path | None, as_json: bool) -> None:
    """List the agents the router proposed for unmatched plan steps and submissions, newest first; with
    --approve ID, approve one. Exit 1 if the router refused the approval."""
    if proposal_id is None:
        if profile_name is not None or once or start:
            raise click.UsageError("--profile, --once and --start are for an approval: use them with --approve ID")
        _list(app, db_path, as_json)
        return
    if db_path is not None:
        raise click.UsageError("--db reads a projection file; --approve needs the bus")
    _approve(app, proposal_id, profile_name, app.settings.in_home(pid_file), once, start, as_json)


def _list(app: App, db_path: Path | None, as_json: bool) -> None:
    from ledgerbus.agentctl.reads import ask

    rows = run(lambda: ask(app, "proposals", "list", {}, db_path))
    if as_json:
        out.print_json(data=rows)
        return
    # The id whole, never cut: it is what --approve takes.
    table = Table(Column("id", no_wrap=True, min_width=22), "step task", "needs", "proposed name", "skills", "status",
                  box=None)
    for r in rows:
        status = f"[green]approved[/] as {r['profile']}" if r["status"] == "approved" else f"[magenta]{r['status']}[/]"
        table.add_row(r["proposal_id"], r["task_id"], ",".join(r["capabilities"]), r["name"], ",".join(r["skills"]),
                      status)
    out.print(table if rows else "[dim]no proposals[/]")


PROPOSALS_SKILL = "proposals"
"""The LLM route that writes a proposed agent's instructions (``[skills.proposals]``)."""
ONE_OFF_DIR = Path("var/proposals")
"""Where ``--once`` keeps the profile of an agent approved for this run only."""


def draft_instructions(app: App, proposal: dict[str, Any]) -> tuple[str, str]:
    """The proposed agent's instructions, and where they came from: the LLM route for
    proposals, else (no route, no key, a failed call: said in the second value) the
    proposal's template."""
    from ledgerbus.agents.llm.base import ChatRequest, Message, ProviderError
    from ledgerbus.agents.llm.router import LLMRouter

    template = str(proposal["prompt"])
    try:
        router = LLMRouter.from_file(app.settings.llm_config_path)
        router.route(PROPOSALS_SKILL)
    except (LedgerbusError, ProviderError) as exc:
        return template, f"the proposal's template ({exc})"
    needs, skills = ", ".join(proposal["capabilities"]), ", ".join(proposal["skills"])
    request = ChatRequest(system="You write the instructions (the system prompt) of one agent in a multi-agent "
                                 "system. Answer with the instructions only, in the second person, at most 200 words.",
                          messages=[Message(role="user", content=(
                              f"The agent is called {proposal['name']}. It serves plan steps that need: {needs}, "
                              f"with the skill(s) {skills}. The step it was proposed for is task "
                              f"{proposal['task_id']}. Say what it is for, how it should work, what it must not "
                              "do, and when to say a task is outside what it can do."))],
                          max_tokens=600)

    async def ask() -> str:
        async with router:
            return (await router.bind(PROPOSALS_SKILL).chat(request)).text.strip()

    try:
        text = run(ask)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the call falls back, said
        return template, f"the proposal's template (the LLM call failed: {exc})"
    if not text:
        return template, "the proposal's template (the model answered nothing)"
    return text[:16_384], f"the LLM route for {PROPOSALS_SKILL}"


def _start_agent(app: App, name: str, profiles_path: Path) -> tuple[int, Path]:
    """``agentctl agent --profile NAME`` as a process of its own (detached from this one):
    its pid and its log file."""
    logs = app.settings.in_home(Path("var/log"))
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"agent-{name}.log"
    env = {**os.environ, "LEDGERBUS_PROFILES_PATH": str(profiles_path)}
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ledgerbus.agentctl", "agent", "--profile", name], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return proc.pid, log_path


def _approve(app: App, proposal_id: str, profile_name: str | None, pid_file: Path, once: bool, start: bool,
             as_json: bool) -> None:
    from ledgerbus.agentctl.reads import ask

    try:
        subjects.token(proposal_id, "proposal id")
    except subjects.SubjectError as exc:
        raise click.BadParameter(str(exc), param_hint="--approve") from exc

    async def lookup() -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await ask(app, "proposals", "get", {"proposal_id": proposal_id}, None)
        except NotFound:
            return None
        return found

    proposal = run(lookup)
    if proposal is None:
        fail(f"no proposal {proposal_id} (`agentctl agents propose` lists them)", EXIT_FAILED)
    if proposal["status"] == "approved":
        fail(f"proposal {proposal_id} was already approved, as profile {proposal['profile']}", EXIT_FAILED)
    name = profile_name or proposal["name"]
    event = ProposalApproved(id=new_id(), proposal_id=proposal_id, profile=name, saved=not once)
    try:
        codec.decode_event(codec.encode(event))  # the router's own schema: a bad name is a usage error here
    except SchemaError as exc:
        raise click.BadParameter(str(exc), param_hint="--profile") from exc
    path = app.settings.in_home(ONE_OFF_DIR) / f"{name}.toml" if once else app.settings.profiles_path
    try:
        if name in profiles.load(app.settings.profiles_path, missing_ok=True).profiles or (
                once and name in profiles.load(path, missing_ok=True).profiles):
            raise click.BadParameter(f"profile {name!r} already exists in {path}; name another with --profile NAME",
                                     param_hint="--profile")
        registry = Registry.load(app.settings.auth_dir)
    except LedgerbusError as exc:
        fail(str(exc))
    instructions, source = draft_instructions(app, proposal)
    err.print(f"[dim]instructions from {source}[/]")
    try:
        profile = msgspec.convert({"instructions": instructions, "skills": proposal["skills"],
                                   "capabilities": proposal["capabilities"]}, profiles.Profile)
    except msgspec.ValidationError as exc:
        fail(f"the proposal does not make a valid profile: {exc}", EXIT_FAILED)
    user = f"agent-{name}"
    if user in registry.entries and set(registry.entries[user][0].skills) != set(profile.skills):
        raise click.BadParameter(
            f"agent {name!r} already exists with skills {','.join(registry.entries[user][0].skills)}; "
            "name another with --profile NAME", param_hint="--profile")

    record = run(lambda: send(app, event, proposal_id))
    if record is None:
        err.print(f"no verdict from the router within {VERDICT_TIMEOUT_S:g}s on the approval of {proposal_id}")
        sys.exit(EXIT_TIMEOUT)
    if not record.accepted:
        if as_json:
            out.print_json(data={"proposal_id": proposal_id, "record": codec.to_builtins(record)})
        else:
            err.print(f"[red]refused[/] ({record.code}): {record.reason}")
        sys.exit(EXIT_FAILED)
    # The approval is in the log: from here on a failure is the local files', and says how to finish by hand.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        profiles.add(path, name, profile)
        creds = add_principal(app.settings.auth_dir, identity("agent", name, profile.skills), pid_file,
                              all_to_stderr=True)
    except LedgerbusError as exc:
        fail(f"proposal {proposal_id} is approved (audit seq {record.seq}), but {exc}. Finish by hand: add "
             f"[profiles.{name}] to {path} and run `agentctl keys add agent {name} --skills "
             f"{','.join(profile.skills)}`", EXIT_BUS)
    started = _start_agent(app, name, path) if start else None
    if as_json:
        out.print_json(data={"proposal_id": proposal_id, "profile": name, "profiles_path": str(path),
                             "saved": not once, "instructions_from": source, "credentials": str(creds),
                             "started": None if started is None else {"pid": started[0], "log": str(started[1])},
                             "record": codec.to_builtins(record)})
        return
    kept = f"for this run only, in {path}" if once else f"saved in {path}"
    err.print(f"[green]approved {proposal_id} as profile {name}[/] [dim](audit seq {record.seq}; {kept})[/]")
    if started is not None:
        err.print(f"started agent {name} (pid {started[0]}, log {started[1]}): the waiting step runs on it")
    else:
        env = f"LEDGERBUS_PROFILES_PATH={path} " if once else ""
        err.print(f"start it with: {env}agentctl agent --profile {name}")
