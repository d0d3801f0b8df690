"""The e2e benchmark's round-by-round ratios: traced against untraced within each round
(the two ran one after the other), by throughput and by CPU per task, so a machine that
got busier between rounds does not decide what tracing costs."""

from __future__ import annotations

from typing import Any

from bench.e2e import _cpu_all, _round_ratios


def run(tasks_per_s: float, cpu: dict[str, float]) -> dict[str, Any]:
    return {"tasks_per_s": tasks_per_s, "cpu_ms_per_task": cpu}


def test_each_round_is_compared_with_its_own_other_run_not_with_the_medians() -> None:
    # The machine was twice as busy in the second round: both systems slowed down.
    per_round = {
        "ledgerbus": [run(1800, {"router": 0.40, "agent": 0.20}), run(900, {"router": 0.80, "agent": 0.45})],
        "ledgerbus-untraced": [run(2000, {"router": 0.35, "agent": 0.15}), run(1000, {"router": 0.70, "agent": 0.30})],
    }
    by_rate = _round_ratios(per_round, "ledgerbus", "ledgerbus-untraced", lambda r: r["tasks_per_s"])
    assert by_rate == [0.9, 0.9]
    by_cpu = _round_ratios(per_round, "ledgerbus-untraced", "ledgerbus", _cpu_all)
    assert [round(x, 3) for x in by_cpu] == [0.833, 0.8]


def test_a_round_with_nothing_measured_is_left_out() -> None:
    per_round = {"ledgerbus": [run(1500, {}), run(1600, {"router": 0.5})],
                 "ledgerbus-untraced": [run(1700, {}), run(1800, {"router": 0.4})]}
    assert _round_ratios(per_round, "ledgerbus-untraced", "ledgerbus", _cpu_all) == [0.8]
