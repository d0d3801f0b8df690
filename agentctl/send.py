"""Sending one event as the CLI user and reporting the router's verdict on it.

The verdict is read from the audit log itself (the records for the event's key after
the log's head at sending time), so it needs no projector.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import click
import nats.errors

from ledgerbus.agentctl.common import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, App, cli_name, err, out, run
from ledgerbus.agentctl.follow import records
from ledgerbus.bus import codec, subjects
from ledgerbus.bus.connection import connected
from ledgerbus.bus.errors import BusError, SchemaError
from ledgerbus.bus.events import AuditRecord, Event, kind_of

VERDICT_TIMEOUT_S = 30.0


async def send(app: App, event: Event, key: str) -> AuditRecord | None:
    """Publish ``event`` to INGRESS and return its audit record (``None`` on timeout)."""
    who = subjects.principal("cli", cli_name())
    async with connected(app.settings, who.token, client_name=f"agentctl-{who.name}") as nc:
        js = nc.jetstream(timeout=10)
        head = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
        try:
            await js.publish(subjects.ingress(who, kind_of(type(event))), codec.encode(event),
                             headers={subjects.HDR_MSG_ID: event.id})
        except (TimeoutError, nats.errors.NoRespondersError) as exc:
            raise BusError("INGRESS did not acknowledge: is the router running?") from exc
        follow = records(js, subjects.audit_for_key(key), from_seq=head + 1, follow=True)
        try:
            async with asyncio.timeout(VERDICT_TIMEOUT_S):
                async for record, _ in follow:
                    if record.msg_id == event.id:
                        return record
        except TimeoutError:
            return None
        finally:
            await follow.aclose()
    return None


def send_and_report(app: App, event: Event, key: str, as_json: bool, done: Callable[[AuditRecord], str]) -> None:
    """Send, print the outcome (``done(record)`` when accepted) and exit 0, 1 or 2.

    The event is first checked against the router's own schema, so a typo gets a usage
    error here rather than a rejection in the log.
    """
    try:
        codec.decode_event(codec.encode(event))
    except SchemaError as exc:
        raise click.UsageError(str(exc)) from exc
    record = run(lambda: send(app, event, key))
    if record is None:
        err.print(f"no verdict from the router within {VERDICT_TIMEOUT_S:g}s on {kind_of(type(event))} for {key}")
        sys.exit(EXIT_TIMEOUT)
    if as_json:
        out.print_json(data=codec.to_builtins(record))
    elif record.accepted:
        err.print(f"[green]{done(record)}[/] [dim](audit seq {record.seq})[/]")
    else:
        err.print(f"[red]refused[/] ({record.code}): {record.reason}")
    sys.exit(EXIT_OK if record.accepted else EXIT_FAILED)
