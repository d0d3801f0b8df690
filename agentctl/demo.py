"""``agentctl demo``: the SOP pipeline, the ``plan`` skill and the ``reason`` loop at work with
no API key and no network, on a recording shipped with the package (docs/replay.md, "The demo").

Every LLM answer the demo shows comes from ``agents/llm/demo/demo.jsonl``: answers written
for this demo, recorded from a real run of the system in which a fake model served them
(``tests/test_demo.py`` makes the file). No model was called then, and none is now: the
routing profile ``agentctl demo profile`` prints sends every call to a ``replay`` provider
on that file. ``agentctl demo sop`` submits the three runs the recording holds, with the
same inputs, to a system started on that profile, and shows what each produced; if a run
fails or a call was not answered from the recording, it says how to start the system on
the profile instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text
from rich.tree import Tree

from ledgerbus.agentctl import pipelines
from ledgerbus.agentctl.common import EXIT_FAILED, EXIT_TIMEOUT, App, err, fail, open_bus, out, projected, run
from ledgerbus.bus.errors import LedgerbusError
from ledgerbus.bus.lifecycle import Status
from ledgerbus.client import Bus, Outcome, TaskHandle, TaskTimeout

SOP_REQUIREMENT = "a todo app"
"""The requirement the recorded SOP pipeline was run on."""
PLAN_INPUT: dict[str, Any] = {"task": "set up a backend and a frontend, then test both"}
"""The recorded ``plan`` task's input."""
REASON_INPUT: dict[str, Any] = {
    "goal": "Check that the echo skill gives back exactly what it is given, then say so in one sentence.",
    "skills": ["echo"],
}
"""The recorded ``reason`` task's input."""

LABEL = "recorded answers written for this demo; no model was called"
"""What every answer the demo shows is (said by the profile, the recording and this command)."""
START = "LEDGERBUS_LLM_CONFIG_PATH=$(agentctl demo profile) honcho start"
"""How to start the system on the demo profile."""

ROLES = [step for step, _ in pipelines.PIPELINES["sop"]]
SHORT = 24
"""How many lines of each answer are shown without ``--full``."""


def demo_dir() -> Path:
    """Where the package keeps the demo's routing profile and recording."""
    return Path(str(resources.files("ledgerbus.agents.llm").joinpath("demo")))


def profile_path() -> Path:
    """The demo's routing profile (``llm.toml``), as installed."""
    return demo_dir() / "llm.toml"


class NotOnDemo(Exception):
    """A run of the demo did not complete from the recording: the system is not on its profile."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(f"{message}. The demo needs its agents on the demo profile: start the system with "
                         f"`{START}`")
        self.code = code


@dataclass
class Run:
    """One of the demo's three runs, once it completed from the recording."""

    name: str
    task_id: str
    output: Any
    agent: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    """Its LLM calls (the ``usage`` projection's rows for its tree), each ``replayed``."""
    steps: dict[str, Any] = field(default_factory=dict)
    """A plan's steps, by step id: task id, agent, status."""
    thoughts: list[dict[str, Any]] = field(default_factory=list)
    """The ``reason`` loop's phases, as it wrote them to its agent's reasoning history."""

    def as_json(self) -> dict[str, Any]:
        """The run for ``--json``."""
        data: dict[str, Any] = {"task_id": self.task_id, "status": "completed", "agent": self.agent,
                                "output": self.output, "calls": self.calls}
        if self.steps:
            data["steps"] = self.steps
        if self.name == "reason":
            data["thoughts"] = self.thoughts
        return data


@click.group()
def demo() -> None:
    """The no-key demo: the SOP pipeline, `plan` and `reason` on a recording shipped with
    ledgerbus (recorded answers written for this demo; no model is called)."""


@demo.command("profile")
def profile() -> None:
    """Print the path of the demo's routing profile, for
    `LEDGERBUS_LLM_CONFIG_PATH=$(agentctl demo profile) honcho start`."""
    path = profile_path()
    if not path.is_file() or not (path.parent / "demo.jsonl").is_file():
        fail(f"this installation has no demo recording at {path.parent} (reinstall ledgerbus)")
    click.echo(str(path))


@demo.command("sop")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for each run before giving up (exit 2).")
@click.option("--full", is_flag=True, help=f"Show every answer whole (default: its first {SHORT} lines).")
@click.option("--json", "as_json", is_flag=True, help="Print the three runs as JSON.")
@click.pass_obj
def sop(app: App, timeout: float, full: bool, as_json: bool) -> None:
    """Run the SOP pipeline on "a todo app", a `plan` task and a `reason` task against a
    system started on the demo profile, and show each result; every LLM answer is replayed
    from the recording. Exit 1 (saying how to start the system on the profile) when a run
    fails or a call was not answered from the recording."""
    try:
        pipeline = pipelines.plan("sop", SOP_REQUIREMENT, app.settings.profiles_path)
    except LedgerbusError as exc:
        fail(str(exc))
    show = not as_json
    most = None if full else SHORT
    if show:
        _print(Panel(Text.assemble(
            ("Every LLM answer below is recorded, not a model's", "bold"), f" ({LABEL}).\nThey are replayed from ",
            (str(demo_dir() / "demo.jsonl"), "cyan"), " by the agents' demo profile; the tasks, plans, agents "
            "and the audit log around them are the real system's."), title="ledgerbus demo", title_align="left",
            border_style="yellow"))

    async def body() -> list[Run]:
        runs: list[Run] = []
        async with open_bus(app) as bus:
            handle = await bus.send_submission(pipeline)
            runs.append(await _finish(bus, "SOP pipeline", handle, timeout, show))
            if show:
                _print(_show_sop(runs[-1], most))
            handle = await bus.submit("plan", PLAN_INPUT)
            runs.append(await _finish(bus, "plan task", handle, timeout, show))
            if show:
                _print(_show_plan(runs[-1], most))
            handle = await bus.submit("reason", REASON_INPUT)
            runs.append(await _finish(bus, "reason task", handle, timeout, show))
            runs[-1].thoughts = await _thoughts(bus, runs[-1])
            if show:
                _print(_show_reason(runs[-1]))
        return runs

    try:
        runs = run(body)
    except NotOnDemo as exc:
        fail(str(exc), exc.code)
    if as_json:
        out.print_json(data={"recorded": LABEL, "profile": str(profile_path()),
                             **{name: r.as_json() for name, r in zip(("sop", "plan", "reason"), runs, strict=True)}})
        return
    calls = sum(len(r.calls) for r in runs)
    _print(f"[green]{calls} LLM calls, every one replayed from the recording[/] (outcome `replayed` in "
              f"`agentctl usage --calls --task ID`; `agentctl llm show CALL` shows one). Fork a run from any point "
              "of its log: docs/replay.md.")


async def _finish(bus: Bus, what: str, handle: TaskHandle, timeout: float, show: bool) -> Run:
    """Wait for one run; raise :class:`NotOnDemo` unless it completed with every call replayed."""
    status = err.status(f"{what}: running on recorded answers...") if show and err.is_terminal else None
    if status is not None:
        status.start()
    try:
        try:
            outcome: Outcome = await handle.wait(timeout)
        except TaskTimeout as exc:
            where = exc.outcome
            unserved = f"; {_one_line(where.warnings[-1])}" if where.warnings else ""
            raise NotOnDemo(f"the demo's {what} {handle.task_id} did not finish in {timeout:g}s "
                            f"(still {where.status}{unserved})", EXIT_TIMEOUT) from None
        if not outcome.completed:
            why = outcome.error or outcome.reason or str(outcome.status)
            raise NotOnDemo(f"the demo's {what} {outcome.task_id} {outcome.status}: {_one_line(why)}")
        task = await projected(bus, handle.task_id, Status.COMPLETED)
        calls: list[dict[str, Any]] = await bus.query("usage", "list",
                                                      {"task_id": handle.task_id, "tree": True, "limit": 1000})
    finally:
        if status is not None:
            status.stop()
    live = sorted({c["outcome"] for c in calls if c["outcome"] != "replayed"})
    if not calls or live:
        how = f"with outcome {', '.join(live)}" if live else "with no LLM call at all"
        raise NotOnDemo(f"the demo's {what} {handle.task_id} completed, but {how}, not replayed from the recording")
    return Run(name=what.split()[0].lower(), task_id=handle.task_id, output=outcome.output,
               agent=outcome.agent or str(task.get("agent") or ""), calls=calls, steps=dict(outcome.steps))


async def _thoughts(bus: Bus, reason: Run) -> list[dict[str, Any]]:
    """The reason loop's phases, from its agent's reasoning history (each entry names its task)."""
    if not reason.agent:
        return []
    memory = await bus.memory(reason.agent)
    return [e["value"] for e in memory["reasoning"]
            if isinstance(e.get("value"), dict) and e["value"].get("task_id") == reason.task_id]


def _one_line(text: str, most: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= most else flat[: most - 3] + "..."


def _print(renderable: Any) -> None:
    # Wrapped to the terminal, unlike the soft-wrapped lines of the other commands: panels
    # of prose and code.
    out.print(renderable, soft_wrap=False)


def _answer(text: str, most: int | None, task_id: str) -> Markdown:
    """An answer (Markdown) whole, or its first ``most`` lines and how to see the rest."""
    lines = text.rstrip().splitlines()
    if most is None or len(lines) <= most:
        return Markdown(text)
    cut = most
    while cut > 1 and lines[cut - 1].lstrip().startswith("|"):
        cut -= 1  # not inside a table: its rows would swallow the note
    kept = lines[:cut]
    if sum(line.lstrip().startswith("```") for line in kept) % 2:
        kept.append("```")  # the cut fell inside a code block: close it
    more = f"*... {len(lines) - cut} more lines: `agentctl demo sop --full`, or `agentctl tasks show {task_id}`*"
    kept += ["", more]
    return Markdown("\n".join(kept))


def _recorded(title: str) -> str:
    return f"{title} [yellow](recorded)[/]"


def _show_sop(r: Run, most: int | None) -> Panel:
    outputs = r.output.get("outputs", {}) if isinstance(r.output, dict) else {}
    parts: list[Any] = []
    for role in ROLES:
        step = r.steps.get(role, {})
        on = f" on {step['agent']}" if step.get("agent") else ""
        text = str(outputs.get(role, {}).get("text", ""))
        parts.append(Panel(_answer(text, most, step.get("task_id", r.task_id)), title=_recorded(role + on),
                           title_align="left", border_style="dim"))
    return Panel(Group(*parts), title=f"1. SOP pipeline: {SOP_REQUIREMENT!r} [dim]({r.task_id})[/]",
                 title_align="left", subtitle="product manager -> architect -> developer -> QA, each reading the "
                 "ones before", subtitle_align="left", border_style="green")


def _show_plan(r: Run, most: int | None) -> Panel:
    output = r.output if isinstance(r.output, dict) else {}
    tree = Tree(_recorded("the model's plan"))
    for step in output.get("steps", []):
        need = step.get("skill") or ", ".join(step.get("capabilities") or [])
        after = f" after {', '.join(step['deps'])}" if step.get("deps") else ""
        tree.add(f"[bold]{step['id']}[/] needs {need}{after}: {_one_line(json.dumps(step.get('input', {})), 120)}")
    outputs = (output.get("output") or {}).get("outputs", {})
    plan_id = str(output.get("plan_task_id") or "")
    parts: list[Any] = [tree, Text(f"submitted and run as plan {plan_id}: {output.get('status')}")]
    for step_id, result in outputs.items():
        text = result.get("text", "") if isinstance(result, dict) else json.dumps(result)
        parts.append(Panel(_answer(str(text), most, f"{plan_id}-{step_id}"), title=_recorded(step_id),
                           title_align="left", border_style="dim"))
    return Panel(Group(*parts), title=f"2. plan: {PLAN_INPUT['task']!r} [dim]({r.task_id})[/]", title_align="left",
                 border_style="green")


def _show_reason(r: Run) -> Panel:
    output = r.output if isinstance(r.output, dict) else {}
    tree = Tree(f"goal: {REASON_INPUT['goal']}")
    branches: dict[int, Tree] = {}
    for thought in r.thoughts:
        n = int(thought.get("iteration", 0))
        branch = branches.get(n) or branches.setdefault(n, tree.add(f"[bold]iteration {n}[/]"))
        phase, said = str(thought.get("phase")), thought.get("output")
        if phase == "act":
            done = "; ".join(f"{a.get('skill')} -> {json.dumps(a.get('output', a.get('error')), ensure_ascii=False)}"
                             for a in said or []) or "nothing to run"
            branch.add(f"act: ran {done}")
        else:
            branch.add(f"{_recorded(phase)}: {_one_line(_said(phase, said), 200)}")
    tree.add(f"[bold]{_recorded('answer')}[/] after {output.get('iterations')} iterations: {output.get('answer')}")
    return Panel(tree, title=f"3. reason: observe -> reason -> plan -> act -> validate [dim]({r.task_id})[/]",
                 title_align="left", border_style="green")


def _said(phase: str, said: Any) -> str:
    """One phase's answer, in words."""
    if not isinstance(said, dict):
        return json.dumps(said, ensure_ascii=False)
    match phase:
        case "observe":
            return "; ".join(str(f).rstrip(".") for f in said.get("facts", []))
        case "reason":
            missing = said.get("missing") or []
            return str(said.get("analysis", "")) + (f" (missing: {', '.join(map(str, missing))})" if missing else "")
        case "plan":
            actions = said.get("actions") or []
            return "; ".join(f"{a.get('skill')} {json.dumps(a.get('input', {}), ensure_ascii=False)}"
                             for a in actions) or "no action: the answer is ready"
        case "validate":
            if said.get("done"):
                return f"done (progress {said.get('progress')})"
            return f"not yet (progress {said.get('progress')}): {said.get('feedback', '')}"
    return json.dumps(said, ensure_ascii=False)
