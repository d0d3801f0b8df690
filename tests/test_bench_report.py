"""The e2e benchmark's step after a pause: the same pauses for every system, and a report
that shows the step only where it was measured."""

from __future__ import annotations

from typing import Any

from bench.common import PAUSE_S, pauses
from bench.e2e_report import rows, section


def test_every_system_waits_the_same_pauses_within_the_range() -> None:
    first, again = pauses(30), pauses(30)
    assert first == again
    assert len(first) == 30 and len(set(first)) == 30
    assert all(PAUSE_S[0] <= p <= PAUSE_S[1] for p in first)
    assert pauses(0) == []


def result(paused: bool) -> dict[str, Any]:
    def system(rate: float, p50: float, after: float) -> dict[str, float]:
        return {"tasks_per_s": rate, "p50_ms": p50, "p99_ms": 2 * p50} | ({"paused_p50_ms": after} if paused else {})

    median = {"ledgerbus": system(2000, 3.0, 6.0), "ledgerbus-every-trace": system(1500, 3.2, 6.4),
              "ledgerbus-untraced": system(2400, 2.9, 5.8), "celery": system(600, 2.8, 4.0)}
    ratio = {"tasks_per_s": 2000 / 600, "untraced_tasks_per_s": 4.0, "p50_ms": 3.0 / 2.8, "p99_ms": 6.0 / 5.6}
    if paused:
        ratio["paused_p50_ms"] = 6.0 / 4.0
    return {"median": median, "ledgerbus_over_celery": ratio, "traced_over_untraced": 2000 / 2400,
            "every_trace_over_untraced": 1500 / 2400}


def test_the_console_table_has_a_row_after_a_pause_only_when_it_was_measured() -> None:
    measured = {row[0]: row for row in rows(result(paused=True))}
    assert measured["e2e latency after a pause, p50 ms"] == (
        "e2e latency after a pause, p50 ms", "6.00 ledgerbus", "4.00 Celery", "1.50")
    assert not any("pause" in row[0] for row in rows(result(paused=False)))


def documented(paused: bool) -> str:
    found = result(paused) | {
        "rounds": 1, "tasks": 5000, "latency_samples": 300, "paused_samples": 30 if paused else 0,
        "rounds_detail": {name: [m | {"notes": []}] for name, m in result(paused)["median"].items()},
        "machine": {"date": "2026-12-05 19:10 UTC", "nproc": 2, "cpu": "cpu", "memory": "24 GiB", "kernel": "k",
                    "python": "3.11", "nats_server": "v2", "redis_server": "7", "packages": {}}}
    return section(found, "python -m bench --only e2e", None)


def test_the_docs_section_has_the_step_after_a_pause_where_it_was_measured() -> None:
    page = documented(paused=True)
    assert "| p50 ms after a pause |" in page
    assert "| ledgerbus, as shipped (traced, ≤ 50 new traces/s) | 2,000 | 3.00 | 6.00 | 6.00 | 2,000 |" in page
    assert "| ledgerbus / Celery, p50 latency after a pause | 1.50 |" in page
    assert "300 latency samples per run, 30 more each after a pause of 0.2-0.8 s, 1 round(s)" in page
    earlier = documented(paused=False)
    assert "| 3.00 | 6.00 | not measured |" in earlier
    assert "after a pause |" not in earlier.split("| ratio (medians) |")[1]


def test_the_p50_ratio_is_shown_each_round_and_paired_where_it_was_measured() -> None:
    paired = {"ledgerbus_p50_ms": 2.01, "celery_p50_ms": 2.18, "p50_ratio": 2.01 / 2.18, "pair_ratio_median": 0.924,
              "pair_ratio_min": 0.74, "pair_ratio_max": 1.13, "pairs": 20, "tasks_each": 1000, "block": 50}
    extra = {"p50_over_celery_rounds": [0.95, 1.2, 0.9], "paired": paired}
    measured = {row[0]: row for row in rows(result(paused=True) | extra)}
    assert measured["e2e latency p50, paired, ms"] == (
        "e2e latency p50, paired, ms", "2.01 ledgerbus", "2.18 Celery", "0.92")
    assert not any("paired" in row[0] for row in rows(result(paused=True)))
    found = result(paused=True) | extra | {
        "rounds": 3, "tasks": 5000, "latency_samples": 300, "paused_samples": 30,
        "rounds_detail": {name: [m | {"notes": []}] for name, m in result(paused=True)["median"].items()},
        "machine": {"date": "d", "nproc": 2, "cpu": "cpu", "memory": "m", "kernel": "k", "python": "3.11",
                    "nats_server": "v2", "redis_server": "7", "packages": {}}}
    page = section(found, "python -m bench --only e2e", None)
    assert "| ledgerbus / Celery, p50 latency (goal ≤ 1: not met) | 1.07 |" in page  # 3.0 against 2.8 ms
    assert "| ledgerbus / Celery, p50 latency, each round's own (the two ran in the same round) | 0.95 " \
           "(rounds 0.95 / 1.20 / 0.90) |" in page
    assert ("| ledgerbus / Celery, p50 latency, paired: both systems up, 1,000 lone tasks a side in blocks of 50 "
            "taking turns (`bench/paired.py`; goal ≤ 1: met) | 0.92 (2.01 against 2.18 ms; the pairs of blocks' own "
            "0.74-1.13, median 0.92) |") in page
    assert "paired" not in documented(paused=True)
