"""``python -m tests.chaos.report FILE``: the figures of a chaos run, as the markdown table
docs/reliability.md quotes. FILE is what ``LEDGERBUS_CHAOS_REPORT`` collected: one JSON
line per schedule."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def table(lines: list[dict]) -> str:
    recovered: dict[str, list[float]] = defaultdict(list)
    for run in lines:
        for fault in run["faults"]:
            recovered[fault["kind"]].append(fault["recovered_s"])
    totals = {k: sum(run["counts"][k] for run in lines) for k in ("ok", "lost", "duplicated", "unknown")}
    out = ["| fault | injected | recovered, median | recovered, max |", "|---|---|---|---|"]
    for kind, times in sorted(recovered.items()):
        out.append(f"| {kind} | {len(times)} | {statistics.median(times):.2f} s | {max(times):.2f} s |")
    out.append("")
    out.append(f"{len(lines)} schedules, {sum(len(r['faults']) for r in lines)} faults, "
               f"{sum(totals.values())} ids: {totals['ok']} ok, {totals['lost']} lost, "
               f"{totals['duplicated']} duplicated, {totals['unknown']} unknown; "
               f"audit verify clean in {sum(r['verify_ok'] for r in lines)} of {len(lines)}; "
               f"longest gap between PubAcks {max(r['longest_ack_gap_s'] for r in lines):.2f} s.")
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if path is None or not path.is_file():
        sys.exit("usage: python -m tests.chaos.report FILE (the LEDGERBUS_CHAOS_REPORT file of a run)")
    print(table([json.loads(line) for line in path.read_text().splitlines() if line.strip()]))


if __name__ == "__main__":
    main()
