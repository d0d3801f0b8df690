"""``agentctl submit``: send a task or a plan, and with ``--wait`` follow it to its end;
``agentctl cancel``: stop a task and everything under it."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click
import msgspec
from rich.live import Live
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from ledgerbus.agentctl import pipelines
from ledgerbus.agentctl.common import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, App, err, fail, open_bus, out, run
from ledgerbus.agentctl.complete import skill_names, task_ids
from ledgerbus.agentctl.reads import STATUS_STYLE
from ledgerbus.bus.errors import LedgerbusError, SchemaError
from ledgerbus.bus.events import (
    DEFAULT_TASK_TIMEOUT_S,
    NO_RETRY,
    Budget,
    PlanSubmitted,
    RetryPolicy,
    TaskSubmitted,
    step_task_id,
)
from ledgerbus.bus.follow import TaskView
from ledgerbus.bus.lifecycle import Status as TaskStatus
from ledgerbus.bus.plan_view import PlanFileError, PlanView, read_plan
from ledgerbus.bus.tracing import Telemetry, configure_telemetry
from ledgerbus.client import Bus, TaskHandle, task_submission


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
@click.argument("skill", required=False, metavar="[SKILL | REQUIREMENT]", shell_complete=skill_names)
@click.option("--plan", "plan_file", metavar="FILE",
              help="Submit the plan in FILE (YAML or JSON; - for stdin) instead of one SKILL task.")
@click.option("--pipeline", type=click.Choice(sorted(pipelines.PIPELINES)),
              help="Submit this pipeline's plan for the requirement given as the argument, its steps played by the "
                   "role profiles of the profiles file (--task-timeout and --retries apply to each step).")
@click.option("--input", "input_", callback=_json_object, metavar="JSON", help="The task input, a JSON object.")
@click.option("--wait", is_flag=True, help="Follow the task until it completes, fails or is rejected; says at once "
              "when no agent serves its skill (and which agent was proposed), and keeps waiting for one.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="With --wait: give up (exit 2) after this many seconds.")
@click.option("--task-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TASK_TIMEOUT_S,
              show_default=True, help="The deadline the agent runs the skill under.")
@click.option("--task-id", help="Use this task id instead of a random one.")
@click.option("--budget-tokens", type=click.IntRange(min=1),
              help="The most tokens the task (or plan, or pipeline) and everything under it may use: it stops "
                   "once they have, and an LLM call that could cross it is not made.")
@click.option("--budget-cost", type=click.FloatRange(min=0, min_open=True),
              help="The same in US dollars (needs prices in the routing file).")
@click.option("--retries", type=click.IntRange(0, 99), default=0, show_default=True,
              help="Run the task again this many times if it fails (then it is dead-lettered).")
@click.option("--backoff", type=click.FloatRange(0, 86_400), default=1.0, show_default=True,
              help="Seconds before the first retry; each next one waits twice as long.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def submit(
    app: App, skill: str | None, plan_file: str | None, pipeline: str | None, input_: dict[str, Any], wait: bool,
    timeout: float, task_timeout: float, task_id: str | None, budget_tokens: int | None, budget_cost: float | None,
    retries: int, backoff: float, as_json: bool,
) -> None:
    """Submit a task for SKILL, a plan (--plan FILE), or a pipeline (--pipeline NAME
    REQUIREMENT). Exit 0 when completed (or submitted, without --wait), 1 when failed or
    rejected, 2 on timeout."""
    if budget_cost is not None:
        _check_prices(app)
    if pipeline is not None:
        if plan_file is not None or input_:
            raise click.UsageError("--pipeline builds its plan and inputs from the profiles: give it without --plan "
                                   "and --input")
        if skill is None:
            raise click.UsageError(f"missing REQUIREMENT: agentctl submit --pipeline {pipeline} \"what to build\"")
        retry = RetryPolicy(max_attempts=retries + 1, backoff_s=backoff) if retries else NO_RETRY
        try:
            plan = pipelines.plan(pipeline, skill, app.settings.profiles_path, task_id, task_timeout, retry)
        except SchemaError as exc:
            raise click.BadParameter(str(exc)) from exc
        except LedgerbusError as exc:
            fail(str(exc))
        sys.exit(_run_plan(app, _with_budget(plan, budget_tokens, budget_cost), wait, timeout, as_json))
    if plan_file is not None:
        if skill is not None:
            raise click.UsageError("give either SKILL or --plan FILE, not both")
        try:
            plan = read_plan(plan_file, task_id)
        except PlanFileError as exc:
            raise click.BadParameter(str(exc), param_hint="--plan") from exc
        if plan.budget is not None and (budget_tokens is not None or budget_cost is not None):
            raise click.UsageError(f"{plan_file} sets the plan's budget already: drop --budget-tokens/--budget-cost "
                                   "or the file's `budget`")
        sys.exit(_run_plan(app, _with_budget(plan, budget_tokens, budget_cost), wait, timeout, as_json))
    if skill is None:
        raise click.UsageError("missing SKILL (or --plan FILE, or --pipeline NAME REQUIREMENT)")
    # Checked here with the router's own schema so a typo gets a message, not a rejection.
    try:
        event = task_submission(skill, input_, task_id=task_id, timeout_s=task_timeout, retries=retries,
                                backoff_s=backoff, budget_tokens=budget_tokens, budget_cost_usd=budget_cost)
    except SchemaError as exc:
        raise click.BadParameter(str(exc)) from exc
    sys.exit(_traced(lambda telemetry: _submit(app, event, wait, timeout, as_json, telemetry)))


def _check_prices(app: App) -> None:
    """Refuse a cost budget nothing could reach: with no prices in the routing file, every
    call costs $0 (the tokens are still counted: use --budget-tokens)."""
    from ledgerbus.agents.llm import config

    try:
        routing = config.load(app.settings.llm_config_path)
    except LedgerbusError as exc:
        fail(str(exc))
    if routing is None or not routing.prices:
        raise click.UsageError(f"--budget-cost needs prices: {app.settings.llm_config_path} has no [prices.MODEL] "
                               "table, so every call costs $0 and the budget could never be reached (use "
                               "--budget-tokens, or add prices)")


def _with_budget(plan: PlanSubmitted, tokens: int | None, cost: float | None) -> PlanSubmitted:
    """``plan`` with the budget the flags give (it covers every step and what is under them)."""
    if tokens is None and cost is None:
        return plan
    return msgspec.structs.replace(plan, budget=Budget(tokens=tokens, cost_usd=cost))


def _run_plan(app: App, plan: PlanSubmitted, wait: bool, timeout: float, as_json: bool) -> int:
    """Submit ``plan`` (and follow it, with ``wait``); the exit code."""
    return _traced(lambda telemetry: _submit_plan(app, plan, wait, timeout, as_json, telemetry))


def _traced(body: Callable[[Telemetry], Coroutine[Any, Any, int]]) -> int:
    """Run ``body`` with this process's telemetry installed: the submission starts the trace."""
    telemetry = configure_telemetry("agentctl")
    try:
        return run(lambda: body(telemetry))
    finally:
        telemetry.shutdown()


async def _submit(app: App, event: TaskSubmitted, wait: bool, timeout: float, as_json: bool,
                  telemetry: Telemetry) -> int:
    async with open_bus(app) as bus:
        handle = await _send(bus, event, telemetry)
        if not wait:
            if as_json:
                out.print_json(data={"task_id": event.task_id, "status": "submitted", "ingress_seq": handle.ingress_seq})
            else:
                out.print(event.task_id)
            return EXIT_OK
        # The follow starts at the log's first record of this task, so it cannot miss any
        # record however late it subscribes.
        view = TaskView(event.task_id, event.id, skill=event.skill)
        try:
            async with asyncio.timeout(timeout):
                await _follow(handle, view, show=not as_json and err.is_terminal)
        except TimeoutError:
            return _report(view, as_json, timed_out=timeout)
        return _report(view, as_json)


async def _send(bus: Bus, event: TaskSubmitted | PlanSubmitted, telemetry: Telemetry) -> TaskHandle:
    """Send the submission through the client, in this process's telemetry: the producer
    span that roots the task's trace is on TRACES when this returns."""
    telemetry.attach(bus.nc, bus.principal.token)
    try:
        return await bus.send_submission(event)
    finally:
        await telemetry.flush()


async def _follow(handle: TaskHandle, view: TaskView, show: bool) -> None:
    """Fold the task's records into ``view`` until it ends (on a timeout, ``view`` is where
    it was), saying its warnings at once and, at a terminal, its state as it changes."""
    status = Status(f"task {handle.task_id}: submitted", console=err) if show else None
    if status:
        status.start()
    shown = 0
    try:
        async for _ in handle.watch(view):
            # Said at once, not at the end: nobody serving the skill is why a wait would be long.
            for warning in view.warnings[shown:]:
                err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
            shown = len(view.warnings)
            if status:
                detail = f" on {view.agent}" if view.agent else ""
                prog = f" - {view.progress}" if view.progress else ""
                status.update(f"task {view.task_id}: {view.status}{detail}{prog}")
    finally:
        if status:
            status.stop()


def _report(view: TaskView, as_json: bool, timed_out: float | None = None) -> int:
    if as_json:
        data = view.as_json()
        if timed_out is not None:
            data["timed_out"] = True
        out.print_json(data=data)
    elif timed_out is not None:
        unserved = f"; no agent serves {view.skill}" if view.unserved else ""
        err.print(f"[yellow]timed out[/] after {timed_out:g}s waiting for task {view.task_id} "
                  f"(last state: {view.status}{escape(unserved)})")
    else:
        colour = STATUS_STYLE[view.status]
        took = f" in {view.seconds:g}s" if view.seconds is not None else ""
        by = f" by {view.agent} (attempt {view.attempts})" if view.agent else ""
        err.print(f"[{colour}]{view.status}[/] task {view.task_id} {view.skill}{by}{took}")
        for note in view.notes:
            err.print(f"  [dim]{note}[/]")
        if view.status is TaskStatus.COMPLETED:
            out.print_json(data=view.output)
        elif view.status is not TaskStatus.REJECTED:
            err.print(f"  error: {view.error}")
        else:
            err.print(f"  rejected ({view.code}): {view.reason}")
    if timed_out is not None:
        return EXIT_TIMEOUT
    return EXIT_OK if view.status is TaskStatus.COMPLETED else EXIT_FAILED


async def _submit_plan(app: App, plan: PlanSubmitted, wait: bool, timeout: float, as_json: bool,
                       telemetry: Telemetry) -> int:
    async with open_bus(app) as bus:
        handle = await _send(bus, plan, telemetry)
        if not wait:
            if as_json:
                out.print_json(data={"task_id": plan.task_id, "status": "submitted", "ingress_seq": handle.ingress_seq,
                                     "steps": {s.id: step_task_id(plan.task_id, s.id) for s in plan.steps}})
            else:
                out.print(plan.task_id)
            return EXIT_OK
        view = PlanView(plan)
        live = Live(plan_table(view), console=err, refresh_per_second=8, transient=False) \
            if not as_json and err.is_terminal else None
        try:
            async with asyncio.timeout(timeout):
                if live is not None:
                    live.start()
                async for _ in handle.watch(view):
                    if live is not None:
                        live.update(plan_table(view))
        except TimeoutError:
            return _report_plan(view, as_json, timed_out=timeout)
        finally:
            if live is not None:
                live.update(plan_table(view))
                live.stop()
        return _report_plan(view, as_json)


def plan_table(view: PlanView) -> Table:
    """The plan's steps as a table: state, agent, attempts, time, and what is going on."""
    colour = STATUS_STYLE.get(view.status, "white")
    table = Table("step", "skill", "after", "prio", "state", "agent", "tries", "took", "",
                  title=f"plan {view.plan.task_id} {view.plan.name} [{colour}]{view.status}[/]", box=None,
                  title_justify="left")
    for step in view.steps.values():
        took = f"{step.seconds:.1f}s" if step.seconds is not None else ""
        style = STATUS_STYLE.get(step.status, "white")
        table.add_row(step.step, step.skill, ",".join(step.deps), str(step.priority), f"[{style}]{step.status}[/]",
                      step.agent, str(step.attempts or ""), took, step.note[:60])
    return table


def _report_plan(view: PlanView, as_json: bool, timed_out: float | None = None) -> int:
    if as_json:
        data = view.as_json()
        if timed_out is not None:
            data["timed_out"] = True
        out.print_json(data=data)
    elif timed_out is not None:
        err.print(f"[yellow]timed out[/] after {timed_out:g}s waiting for plan {view.plan.task_id} "
                  f"(last state: {view.status})")
    elif view.status is TaskStatus.REJECTED:
        err.print(f"[red]rejected[/] plan {view.plan.task_id} ({view.code}): {view.reason}")
    else:
        if not err.is_terminal:
            err.print(plan_table(view))
        if view.status is TaskStatus.COMPLETED:
            out.print_json(data=view.output)
        else:
            err.print(f"  error: {view.error}")
    if timed_out is not None:
        return EXIT_TIMEOUT
    return EXIT_OK if view.status is TaskStatus.COMPLETED else EXIT_FAILED


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@click.option("--reason", default="", help="Why (recorded in the audit log).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.pass_obj
def cancel(app: App, task_id: str, reason: str, as_json: bool) -> None:
    """Cancel TASK_ID and everything under it (plan steps, delegated subtasks): what has not
    run never will, and running skills are told to stop. Exit 1 if the router refused."""
    from ledgerbus.agentctl.send import send_and_report

    send_and_report(app, lambda bus: bus.cancel(task_id, reason), task_id, as_json, lambda r: f"cancelled {r.key}")
