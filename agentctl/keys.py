"""``agentctl keys``: the principals that may connect, and their credentials."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import click
from rich.table import Table

from ledgerbus.agentctl.common import EXIT_FAILED, App, fail, out
from ledgerbus.bus.errors import LedgerbusError
from ledgerbus.bus.identity import CREDS_DIR, Identity, Registry, identity


@click.group()
def keys() -> None:
    """Principals and their NATS credentials (in LEDGERBUS_AUTH_DIR, default var/auth)."""


@keys.command("add")
@click.argument("kind", type=click.Choice(["cli", "agent", "admin", "router", "projector"]))
@click.argument("name", required=False, default="")
@click.option("--skills", default="", help="For an agent: the skills whose work it may pull, comma-separated.")
@click.option("--pid-file", type=click.Path(dir_okay=False, path_type=Path), default=Path("var/nats.pid"),
              show_default=True, help="A running nats-server to reload so the change applies now.")
@click.pass_obj
def add(app: App, kind: str, name: str, skills: str, pid_file: Path) -> None:
    """Add a principal (or change an agent's skills) and write its credentials file."""
    try:
        add_principal(app.settings.auth_dir, identity(kind, name, [s.strip() for s in skills.split(",") if s.strip()]),
                      app.settings.in_home(pid_file))
    except LedgerbusError as exc:
        fail(str(exc))


def add_principal(auth_dir: Path, ident: Identity, pid_file: Path, *, all_to_stderr: bool = False) -> Path:
    """Add ``ident`` to the registry in ``auth_dir`` (or change an agent's skills), write its
    credentials file, and ask the nats-server whose pid is in ``pid_file`` to reload so it
    applies now. Returns the credentials file; raises :class:`LedgerbusError` if nothing
    was written. What it did is said on stdout (on stderr with ``all_to_stderr``, for
    commands whose stdout is JSON)."""
    registry = Registry.load(auth_dir)
    registry.add(ident)
    registry.save()
    creds = auth_dir / CREDS_DIR / f"{ident.user}.json"
    click.echo(f"{ident.user}: credentials in {creds}", err=all_to_stderr)
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
            click.echo("asked nats-server to reload its configuration", err=all_to_stderr)
        except (OSError, ValueError) as exc:
            click.echo(f"could not reload nats-server ({exc}): restart it to apply", err=True)
    else:
        click.echo("reload nats-server to apply (no pid file at " f"{pid_file})", err=True)
    return creds


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def list_(app: App, as_json: bool) -> None:
    """The principals that may connect (never their passwords)."""
    try:
        registry = Registry.load(app.settings.auth_dir)
    except LedgerbusError as exc:
        fail(str(exc))
    rows: list[dict[str, str]] = [
        {"principal": i.user, "kind": i.kind, "skills": ",".join(i.skills)} for i, _ in registry.entries.values()
    ]
    if as_json:
        out.print_json(data=rows)
        return
    table = Table("principal", "kind", "skills", box=None)
    for r in rows:
        table.add_row(r["principal"], r["kind"], r["skills"])
    out.print(table if rows else f"[dim]no principals in {app.settings.auth_dir}[/]")


@keys.group("token")
def token() -> None:
    """Bearer tokens for the HTTP API (`agentctl web`), each bound to one CLI principal."""


@token.command("add")
@click.argument("name")
@click.option("--note", default="", help="What the token is for (shown by `keys token list`).")
@click.option("--link", is_flag=True,
              help="Print a sign-in link to the control center instead (the token rides in the link's fragment, "
                   "which the browser never sends).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def token_add(app: App, name: str, note: str, link: bool, as_json: bool) -> None:
    """Issue a token that acts as cli-NAME (whose credentials must exist). It is printed
    once: only its hash and the credentials sealed under it are kept."""
    from ledgerbus.bus import tokens

    principal = name if name.startswith("cli-") else f"cli-{name}"
    try:
        value = tokens.issue(app.settings.auth_dir, principal, note)
    except LedgerbusError as exc:
        fail(str(exc))
    if as_json:
        out.print_json(data={"token": value, "principal": principal, "id": tokens.parse(value)[0]})
    elif link:
        host = os.environ.get("LEDGERBUS_WEB_HOST", "127.0.0.1")
        click.echo(f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:"
                   f"{os.environ.get('LEDGERBUS_WEB_PORT', '8080')}/#token={value}")
    else:
        click.echo(value)
        click.echo(f"acts as {principal}; shown once (revoke: agentctl keys token revoke {tokens.parse(value)[0]})",
                   err=True)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def token_list(app: App, as_json: bool) -> None:
    """The tokens issued (id, principal, when, note; never the token)."""
    from ledgerbus.bus import tokens

    try:
        rows = [tokens.describe(t) for t in tokens.load(app.settings.auth_dir).values()]
    except LedgerbusError as exc:
        fail(str(exc))
    if as_json:
        out.print_json(data=rows)
        return
    table = Table("id", "principal", "created", "note", box=None)
    for r in rows:
        table.add_row(r["id"], r["principal"], r["created_at"][:19], r["note"])
    out.print(table if rows else "[dim]no tokens[/]")


@token.command("revoke")
@click.argument("token_id")
@click.pass_obj
def token_revoke(app: App, token_id: str) -> None:
    """Revoke a token (its id, or the token): the gateway refuses it from its next request."""
    from ledgerbus.bus import tokens

    try:
        gone = tokens.revoke(app.settings.auth_dir, token_id)
    except LedgerbusError as exc:
        fail(str(exc))
    if gone is None:
        fail(f"no token {token_id}", EXIT_FAILED)
    click.echo(f"revoked token {gone.id} of {gone.principal}", err=True)
