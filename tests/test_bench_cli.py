"""``python -m bench`` refuses a count it cannot run before it starts anything.

A run of no rounds or no samples has no median: it used to start servers, measure, and
then fail inside ``statistics`` with a traceback that did not name the option.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--rounds", "0", "argument --rounds: must be at least 1: '0'"),
    ("--e2e-samples", "-3", "argument --e2e-samples: must be at least 1: '-3'"),
    ("--messages", "many", "argument --messages: not a whole number: 'many'"),
    ("--e2e-paused", "-1", "argument --e2e-paused: must be at least 0: '-1'"),
    ("--e2e-paired", "-5", "argument --e2e-paired: must be at least 0: '-5'"),
    ("--e2e-paired", "10", "argument --e2e-paired: fewer than one block of 50 (0 leaves the step out): '10'"),
])
def test_a_count_below_one_or_not_a_number_is_refused_by_name(option: str, value: str, said: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "router", option, value],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr
    assert "Traceback" not in done.stderr
