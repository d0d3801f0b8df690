"""``agentctl agents propose``: the agents the router proposed for plan steps (and, under
policy ``[tasks] unserved = "propose"``, submissions) that no live agent could serve, and
approving one.

When a step names capabilities no live agent offers, the router records ``skill_unmatched``
with a proposed agent (a name, skills, capabilities, instructions) and the step waits.
``--approve ID`` records ``proposal_approved`` through the router and, once the router
has accepted it, saves the proposal as a profile in the profiles file and makes the
agent's identity (as ``agentctl keys add agent NAME --skills ...`` does, reloading the
server). Then ``agentctl agent --profile NAME`` starts it, and the waiting step runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.table import Column, Table

from agentctl.common import EXIT_BUS, EXIT_FAILED, EXIT_TIMEOUT, App, err, fail, out, run
from agentctl.keys import add_principal
from agentctl.send import VERDICT_TIMEOUT_S, send
from agents import profiles
from bus import codec, subjects
from bus.errors import LedgerbusError, NotFound, SchemaError
from bus.events import ProposalApproved, new_id
from bus.identity import Registry, identity


@click.command("propose")
@click.option("--approve", "proposal_id", metavar="ID",
              help="Approve proposal ID: save it as an agent profile and make the agent's identity.")
@click.option("--profile", "profile_name", metavar="NAME",
              help="With --approve: the name of the profile (and agent).  [default: the proposed name]")
@click.option("--pid-file", type=click.Path(dir_okay=False, path_type=Path), default=Path("var/nats.pid"),
              show_default=True, help="With --approve: a running nats-server to reload so the new agent may connect.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Read this projection database file instead of asking the projector.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def propose(app: App, proposal_id: str | None, profile_name: str | None, pid_file: Path, db_path: Path | None,
            as_json: bool) -> None:
    """List the agents the router proposed for unmatched plan steps and submissions, newest first; with
    --approve ID, approve one. Exit 1 if the router refused the approval."""
    if proposal_id is None:
        if profile_name is not None:
            raise click.UsageError("--profile NAME names the profile an approval saves: use it with --approve ID")
        _list(app, db_path, as_json)
        return
    if db_path is not None:
        raise click.UsageError("--db reads a projection file; --approve needs the bus")
    _approve(app, proposal_id, profile_name, pid_file, as_json)


def _list(app: App, db_path: Path | None, as_json: bool) -> None:
    from agentctl.reads import ask

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


def _approve(app: App, proposal_id: str, profile_name: str | None, pid_file: Path, as_json: bool) -> None:
    from agentctl.reads import ask

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
    event = ProposalApproved(id=new_id(), proposal_id=proposal_id, profile=name)
    try:
        codec.decode_event(codec.encode(event))  # the router's own schema: a bad name is a usage error here
        profile = msgspec.convert({"instructions": proposal["prompt"], "skills": proposal["skills"],
                                   "capabilities": proposal["capabilities"]}, profiles.Profile)
    except (SchemaError, msgspec.ValidationError) as exc:
        raise click.BadParameter(str(exc), param_hint="--profile") from exc
    path = app.settings.profiles_path
    try:
        if name in profiles.load(path, missing_ok=True).profiles:
            raise click.BadParameter(f"profile {name!r} already exists in {path}; name another with --profile NAME",
                                     param_hint="--profile")
        registry = Registry.load(app.settings.auth_dir)
    except LedgerbusError as exc:
        fail(str(exc))
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
        profiles.add(path, name, profile)
        creds = add_principal(app.settings.auth_dir, identity("agent", name, profile.skills), pid_file,
                              all_to_stderr=True)
    except LedgerbusError as exc:
        fail(f"proposal {proposal_id} is approved (audit seq {record.seq}), but {exc}. Finish by hand: add "
             f"[profiles.{name}] to {path} and run `agentctl keys add agent {name} --skills "
             f"{','.join(profile.skills)}`", EXIT_BUS)
    if as_json:
        out.print_json(data={"proposal_id": proposal_id, "profile": name, "profiles_path": str(path),
                             "credentials": str(creds), "record": codec.to_builtins(record)})
        return
    err.print(f"[green]approved {proposal_id} as profile {name}[/] [dim](audit seq {record.seq}; saved in {path})[/]")
    err.print(f"start it with: agentctl agent --profile {name}")
