"""``agentctl approve`` and ``agentctl deny``: decide on a task held for approval."""

from __future__ import annotations

import asyncio
import sys

import click

from agentctl.common import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, App, cli_name, err, out, run
from agentctl.follow import records
from bus import codec, subjects
from bus.connection import connected
from bus.errors import BusError
from bus.events import AuditRecord, TaskApproved, TaskDenied, kind_of, new_id


def _decide(app: App, event: TaskApproved | TaskDenied, as_json: bool) -> None:
    who = subjects.principal("cli", cli_name())

    async def body() -> AuditRecord | None:
        async with connected(app.settings, who.token, client_name=f"agentctl-{who.name}") as nc:
            js = nc.jetstream(timeout=10)
            try:
                await js.publish(subjects.ingress(who, kind_of(type(event))), codec.encode(event),
                                 headers={subjects.HDR_MSG_ID: event.id})
            except TimeoutError as exc:
                raise BusError("INGRESS did not acknowledge: is the router running?") from exc
            # The router's verdict on this very message, read from the task's history.
            follow = records(js, subjects.audit_for_key(event.task_id), follow=True)
            try:
                async with asyncio.timeout(30):
                    async for record, _ in follow:
                        if record.msg_id == event.id:
                            return record
            except TimeoutError:
                return None
            finally:
                await follow.aclose()
        return None

    record = run(body)
    if record is None:
        err.print(f"no verdict from the router within 30s on {kind_of(type(event))} for {event.task_id}")
        sys.exit(EXIT_TIMEOUT)
    if as_json:
        out.print_json(data=codec.to_builtins(record))
    elif record.accepted:
        err.print(f"[green]{'approved' if isinstance(event, TaskApproved) else 'denied'}[/] task {event.task_id}")
    else:
        err.print(f"[red]refused[/] ({record.code}): {record.reason}")
    sys.exit(EXIT_OK if record.accepted else EXIT_FAILED)


@click.command()
@click.argument("task_id")
@click.option("--reason", default="", help="Recorded with the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print the router's audit record as JSON.")
@click.pass_obj
def approve(app: App, task_id: str, reason: str, as_json: bool) -> None:
    """Let TASK_ID, held for approval, run. Exit 0 when the router accepts the approval."""
    _decide(app, TaskApproved(id=new_id(), task_id=task_id, reason=reason), as_json)


@click.command()
@click.argument("task_id")
@click.option("--reason", default="", help="Recorded with the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print the router's audit record as JSON.")
@click.pass_obj
def deny(app: App, task_id: str, reason: str, as_json: bool) -> None:
    """Refuse TASK_ID, held for approval: it never runs. Exit 0 when the router accepts."""
    _decide(app, TaskDenied(id=new_id(), task_id=task_id, reason=reason), as_json)
