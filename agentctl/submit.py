"""``agentctl submit``: send a task, and with ``--wait`` follow it to its end."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
import nats.errors
from opentelemetry import trace
from rich.status import Status

from agentctl.common import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, App, cli_name, err, out, run
from agentctl.follow import TaskView, records
from bus import codec, subjects, tracing
from bus.connection import connected
from bus.errors import BusError, SchemaError
from bus.events import DEFAULT_TASK_TIMEOUT_S, TaskSubmitted, kind_of, new_id
from bus.tracing import configure_tracing


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


@click.command()
@click.argument("skill")
@click.option("--input", "input_", callback=_json_object, metavar="JSON", help="The task input, a JSON object.")
@click.option("--wait", is_flag=True, help="Follow the task until it completes, fails or is rejected.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="With --wait: give up (exit 2) after this many seconds.")
@click.option("--task-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TASK_TIMEOUT_S,
              show_default=True, help="The deadline the agent runs the skill under.")
@click.option("--task-id", help="Use this task id instead of a random one.")
@click.option("--budget-tokens", type=click.IntRange(min=1), help="Fail the task once it has used this many tokens.")
@click.option("--budget-cost", type=click.FloatRange(min=0, min_open=True),
              help="Fail the task once it has spent this many US dollars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def submit(
    app: App, skill: str, input_: dict[str, Any], wait: bool, timeout: float, task_timeout: float,
    task_id: str | None, budget_tokens: int | None, budget_cost: float | None, as_json: bool,
) -> None:
    """Submit a task for SKILL. Exit 0 when completed (or submitted, without --wait),
    1 when failed or rejected, 2 on timeout."""
    event_data = {"kind": "task_submitted", "id": new_id(), "task_id": task_id or new_id(), "skill": skill,
                  "input": input_, "timeout_s": task_timeout}
    if budget_tokens is not None or budget_cost is not None:
        event_data["budget"] = {"tokens": budget_tokens, "cost_usd": budget_cost}
    # Validate here with the router's own schema so a typo gets a message, not a rejection.
    try:
        event = codec.decode_event(codec.encode(event_data))
    except SchemaError as exc:
        raise click.BadParameter(str(exc)) from exc
    assert isinstance(event, TaskSubmitted)
    provider = configure_tracing("agentctl")
    try:
        code = run(lambda: _submit(app, event, wait, timeout, as_json))
    finally:
        provider.shutdown()
    sys.exit(code)


async def _submit(app: App, event: TaskSubmitted, wait: bool, timeout: float, as_json: bool) -> int:
    who = subjects.principal("cli", cli_name())
    subject = subjects.ingress(who, kind_of(TaskSubmitted))
    async with connected(app.settings, who.token, client_name=f"agentctl-{who.name}") as nc:
        js = nc.jetstream(timeout=10)
        tracer = trace.get_tracer("ledgerbus.cli")
        with tracer.start_as_current_span(
            "agentctl.submit",
            kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject,
                        "messaging.operation": "publish", "messaging.message.id": event.id,
                        "ledgerbus.task_id": event.task_id, "ledgerbus.skill": event.skill},
        ):
            headers = tracing.inject({subjects.HDR_MSG_ID: event.id})
            try:
                ack = await js.publish(subject, codec.encode(event), headers=headers)
            except nats.errors.NoRespondersError as exc:
                raise BusError("no INGRESS stream: is the router running?") from exc
        if not wait:
            if as_json:
                out.print_json(data={"task_id": event.task_id, "status": "submitted", "ingress_seq": ack.seq})
            else:
                out.print(event.task_id)
            return EXIT_OK
        # The follow starts at the log's first record of this task, so it cannot miss any
        # record however late it subscribes.
        view = TaskView(event.task_id, event.id)
        try:
            async with asyncio.timeout(timeout):
                await _follow(js, view, show=not as_json and err.is_terminal)
        except TimeoutError:
            return _report(view, as_json, timed_out=timeout)
        return _report(view, as_json)


async def _follow(js: Any, view: TaskView, show: bool) -> None:
    status = Status(f"task {view.task_id}: submitted", console=err) if show else None
    if status:
        status.start()
    follow = records(js, subjects.audit_for_key(view.task_id), follow=True)
    try:
        async for record, _ in follow:
            view.apply(record)
            if status:
                detail = f" on {view.agent}" if view.agent else ""
                prog = f" - {view.progress}" if view.progress else ""
                status.update(f"task {view.task_id}: {view.status}{detail}{prog}")
            if view.terminal:
                return
    finally:
        await follow.aclose()
        if status:
            status.stop()


def _report(view: TaskView, as_json: bool, timed_out: float | None = None) -> int:
    if as_json:
        data = view.as_json()
        if timed_out is not None:
            data["timed_out"] = True
        out.print_json(data=data)
    elif timed_out is not None:
        err.print(f"[yellow]timed out[/] after {timed_out:g}s waiting for task {view.task_id} (last state: {view.status})")
    else:
        colour = {"completed": "green", "failed": "red", "rejected": "red", "denied": "red"}[view.status]
        took = f" in {view.seconds:g}s" if view.seconds is not None else ""
        by = f" by {view.agent} (attempt {view.attempts})" if view.agent else ""
        err.print(f"[{colour}]{view.status}[/] task {view.task_id} {view.skill}{by}{took}")
        for note in view.notes:
            err.print(f"  [dim]{note}[/]")
        if view.status == "completed":
            out.print_json(data=view.output)
        elif view.status in ("failed", "denied"):
            err.print(f"  error: {view.error}")
        else:
            err.print(f"  rejected ({view.code}): {view.reason}")
    if timed_out is not None:
        return EXIT_TIMEOUT
    return EXIT_OK if view.status == "completed" else EXIT_FAILED
