"""``python -m bench.paired``: what it makes of the two systems' alternating blocks, and
the counts it refuses before it starts anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.paired import summary
from tests.support import REPO


def test_the_summary_pools_each_side_and_takes_each_pairs_own_ratio() -> None:
    ms = 0.001
    ledgerbus = [[3 * ms, 3 * ms, 9 * ms], [2 * ms, 2 * ms, 2 * ms]]
    celery = [[2 * ms, 2 * ms, 2 * ms], [2 * ms, 4 * ms, 4 * ms]]
    found = summary(ledgerbus, celery)
    assert found["ledgerbus_p50_ms"] == pytest.approx(2.5)  # of 2, 2, 2, 3, 3, 9
    assert found["celery_p50_ms"] == pytest.approx(2.0)  # of 2, 2, 2, 2, 4, 4
    assert found["p50_ratio"] == pytest.approx(1.25)
    # The pairs' own ratios: 3/2 and 2/4; their median is their mean.
    assert (found["pair_ratio_min"], found["pair_ratio_max"]) == (pytest.approx(0.5), pytest.approx(1.5))
    assert found["pair_ratio_median"] == pytest.approx(1.0)
    assert (found["pairs"], found["tasks_each"]) == (2, 6)
    assert found["ledgerbus_p99_ms"] > found["ledgerbus_p50_ms"]


def test_the_summary_needs_a_block_of_each_side_per_pair() -> None:
    with pytest.raises(ValueError, match="one block of each system per pair"):
        summary([[0.001]], [])


def test_fewer_tasks_than_a_block_are_refused_by_name_before_anything_starts() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.paired", "--tasks", "10", "--block", "50"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "--tasks 10 is fewer than one block of 50 (--block)" in done.stderr
    assert "Traceback" not in done.stderr
