"""``agentctl trace ID``: one task's trace as a waterfall, read from the TRACES stream.

Every process publishes the spans it finishes to TRACES, so this needs nothing but the
bus: no Jaeger, no collector. The tree follows the parent links; the critical path is the
chain of last-finishing children from the root; failed spans are red. ``--json`` prints
the spans as OTLP/JSON.
"""

from __future__ import annotations

import re

import click
import msgspec
from rich.table import Table
from rich.text import Text

from ledgerbus.agentctl.common import EXIT_FAILED, App, cli_name, fail, out, run
from ledgerbus.agentctl.complete import task_ids
from ledgerbus.bus import subjects
from ledgerbus.bus.connection import connected
from ledgerbus.bus.spans import SpanBatch, SpanRecord, to_otlp_json
from ledgerbus.bus.trace_tree import Node, TraceTree, build_tree, read_trace, trace_id_of
from ledgerbus.bus.tracing import DEFAULT_TRACE_RATE

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_SERVICE_COLOURS = ("cyan", "magenta", "green", "blue", "yellow", "bright_cyan", "bright_magenta", "bright_green")
BAR_MIN, BAR_MAX = 12, 60
"""The timeline column's width: what the terminal leaves after the other columns."""


def detail(span: SpanRecord) -> str:
    """The few attributes that say what a span did, for the waterfall."""
    a = span.attributes
    match span.name.split(" ", 1)[0]:
        case "router.process":
            return f"{a.get('ledgerbus.kind', '')} {a.get('ledgerbus.code', '')}".strip()
        case "router.check":
            return str(a.get("ledgerbus.code", ""))
        case "router.dispatch" | "agentctl.submit":
            return str(a.get("messaging.destination.name", ""))
        case "agent.run":
            return f"{a.get('ledgerbus.agent', '')} attempt {a.get('ledgerbus.attempt', '')}"
        case "llm.chat":
            tokens = f"{a.get('gen_ai.usage.input_tokens', 0)}→{a.get('gen_ai.usage.output_tokens', 0)} tok"
            return f"{a.get('gen_ai.request.model', '')} {tokens}"
        case "shell.exec":
            return f"{a.get('process.executable.name', '')} exit {a.get('process.exit.code', '?')}"
        case "audit.append" | "projector.apply":
            return f"seq {a.get('ledgerbus.audit.seq', '')}"
    return ""


def _duration(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e3:.0f} µs"


def _bar(span: SpanRecord, start: int, total: int, style: str, width: int) -> Text:
    offset = int((span.start_ns - start) / total * width) if total else 0
    length = max(1, round(span.duration_ns / total * width)) if total else 1
    offset = min(offset, width - 1)
    length = min(length, width - offset)
    return Text(" " * offset) + Text("█" * length, style=style) + Text(" " * (width - offset - length))


def render(tree: TraceTree, task_id: str, every_check: bool = False, width: int = 120) -> Table:
    """The waterfall for a terminal ``width`` columns wide: one row per span, indented by
    depth, bars on a shared time axis.

    The router's passing checks of one message share a row (``every_check`` gives each
    its own); a failing check always has its own, in red.
    """
    start, total = tree.start_ns, tree.end_ns - tree.start_ns
    colours = {s: _SERVICE_COLOURS[i % len(_SERVICE_COLOURS)] for i, s in enumerate(tree.services)}
    title = (f"trace {tree.trace_id}" + (f" · task {task_id}" if task_id else "")
             + f" · {tree.count} spans · {len(tree.services)} services · {_duration(total)}")
    depth: dict[str, int] = {}
    checks: list[Node] = []
    rows: list[tuple[bool, Text, Text, str, SpanRecord, str]] = []

    def row(node: Node, label: str, span: SpanRecord) -> None:
        level = depth[node.span.span_id]
        name = Text("  " * level)
        name.append(label, style="bold red" if span.failed else ("bold" if node.critical else ""))
        if node.orphan:
            name.append(" (parent not in TRACES)", style="dim")
        if extra := detail(span):
            name.append(f"  {extra}", style="dim")
        if span.failed and span.status_message:
            name.append(f"  ✗ {span.status_message[:80]}", style="red")
        colour = colours[node.service]
        rows.append((node.critical, name, Text(node.service.removeprefix("ledgerbus-"), style=colour),
                     _duration(span.duration_ns), span, "red" if span.failed else colour))

    def flush_checks() -> None:
        if len(checks) == 1:
            row(checks[0], checks[0].span.name, checks[0].span)
        elif checks:
            first, last = checks[0].span, checks[-1].span
            merged = msgspec.structs.replace(first, name="router.check", start_ns=first.start_ns, end_ns=last.end_ns)
            row(checks[0], f"router.check ×{len(checks)} passed", merged)
        checks.clear()

    for node in tree.walk():
        span = node.span
        depth[span.span_id] = depth.get(span.parent_span_id, -1) + 1 if not node.orphan else 0
        if (not every_check and span.name.startswith("router.check ") and not span.failed
                and (not checks or checks[0].span.parent_span_id == span.parent_span_id)):
            checks.append(node)
            continue
        flush_checks()
        row(node, span.name, span)
    flush_checks()
    names = max((len(r[1]) for r in rows), default=4)
    services = max((len(r[2]) for r in rows), default=7)
    bar = max(BAR_MIN, min(BAR_MAX, width - min(names, 70) - services - 9 - 1 - 8))
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, show_edge=False)
    table.add_column("", min_width=1, no_wrap=True)
    table.add_column("span", overflow="fold", max_width=max(20, width - services - bar - 18))
    table.add_column("service", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True, min_width=8)
    table.add_column(f"0 … {_duration(total)}", no_wrap=True, min_width=bar)
    for critical, name, service, duration, span, style in rows:
        table.add_row(Text("●", style="yellow") if critical else "", name, service, duration,
                      _bar(span, start, total, style, bar))
    path = tree.critical_path()
    table.caption = ("● critical path: " + " → ".join(n.span.name for n in path)
                     + f"  ({_duration(path[-1].span.end_ns - path[0].span.start_ns) if path else '0'})")
    table.caption_justify = "left"
    return table


@click.command("trace")
@click.argument("ident", metavar="TASK_ID|TRACE_ID", shell_complete=task_ids)
@click.option("--json", "as_json", is_flag=True, help="Print the spans as OTLP/JSON (Jaeger's UI loads it).")
@click.option("--all-checks", "every_check", is_flag=True,
              help="One row per router check (passing checks of a message share a row by default).")
@click.pass_obj
def trace_cmd(app: App, ident: str, as_json: bool, every_check: bool) -> None:
    """Draw the trace of a task (or a trace id) as a waterfall: every hop through the CLI,
    router, agents and projector, with durations, the critical path and errors in red."""
    try:
        subjects.token(ident, "task or trace id")
    except subjects.SubjectError as exc:
        raise click.BadParameter(str(exc), param_hint="TASK_ID") from exc

    async def body() -> tuple[str, str, list[SpanBatch]]:
        who = subjects.principal("cli", cli_name())
        async with connected(app.settings, who.token, client_name=f"agentctl-{who.name}") as nc:
            js = nc.jetstream(timeout=10)
            task_id, trace_id = ident, ""
            if _TRACE_ID.match(ident):
                task_id, trace_id = "", ident
            else:
                trace_id = await trace_id_of(js, ident)
                if not trace_id:
                    fail(f"no traced record of task {ident} in the audit log", EXIT_FAILED)
            return task_id, trace_id, await read_trace(js, trace_id)

    task_id, trace_id, batches = run(body)
    if not batches:
        fail(f"no spans of trace {trace_id} on TRACES: they are kept for "
             f"{app.settings.traces_max_age_s:g} s and arrive within a second of ending, and a trace is "
             f"recorded only while the process that starts it starts at most LEDGERBUS_TRACE_RATE a second "
             f"(default {DEFAULT_TRACE_RATE:g}; inf records every one)", EXIT_FAILED)
    if as_json:
        out.print_json(data=to_otlp_json(batches))
        return
    out.print(render(build_tree(trace_id, batches), task_id, every_check, out.width))

