"""Sending one request as the CLI user and reporting the router's verdict on it.

The verdict is read from the audit log itself (the records for the request's key after
the log's head at sending time), so it needs no projector: :meth:`ledgerbus.client.Bus.send`.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import click

from ledgerbus.agentctl.common import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, App, err, open_bus, out, run
from ledgerbus.bus import codec
from ledgerbus.bus.errors import SchemaError
from ledgerbus.bus.events import Event, kind_of
from ledgerbus.bus.records import AuditRecord
from ledgerbus.client import VERDICT_TIMEOUT_S, Bus, Refused

Request = Event | Callable[[Bus], Awaitable[AuditRecord]]
"""An event to send as it is, or a client call that sends one (``bus.cancel(...)``)."""


async def send(app: App, event: Event, key: str) -> AuditRecord | None:
    """Publish ``event`` to INGRESS and return its audit record, accepted or refused
    (``None`` without a verdict in :data:`VERDICT_TIMEOUT_S`)."""
    return await _verdict(app, lambda bus: bus.send(event, key))


async def _verdict(app: App, call: Callable[[Bus], Awaitable[AuditRecord]]) -> AuditRecord | None:
    async with open_bus(app) as bus:
        try:
            return await call(bus)
        except Refused as exc:
            return exc.record
        except TimeoutError:
            return None


def send_and_report(app: App, request: Request, key: str, as_json: bool, done: Callable[[AuditRecord], str]) -> None:
    """Send, print the outcome (``done(record)`` when accepted) and exit 0, 1 or 2.

    An event is first checked against the router's own schema, so a typo gets a usage
    error here rather than a rejection in the log.
    """
    if isinstance(request, Event):
        try:
            codec.decode_event(codec.encode(request))
        except SchemaError as exc:
            raise click.UsageError(str(exc)) from exc
        event = request
        what = kind_of(type(request))
        call: Callable[[Bus], Awaitable[AuditRecord]] = lambda bus: bus.send(event, key)  # noqa: E731
    else:
        call, what = request, "the request"

    record = run(lambda: _verdict(app, call))
    if record is None:
        err.print(f"no verdict from the router within {VERDICT_TIMEOUT_S:g}s on {what} for {key}")
        sys.exit(EXIT_TIMEOUT)
    if as_json:
        out.print_json(data=codec.to_builtins(record))
    elif record.accepted:
        err.print(f"[green]{done(record)}[/] [dim](audit seq {record.seq})[/]")
    else:
        err.print(f"[red]refused[/] ({record.code}): {record.reason}")
    sys.exit(EXIT_OK if record.accepted else EXIT_FAILED)
