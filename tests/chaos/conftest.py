"""The chaos suite: ``pytest -m chaos tests/chaos -n 0`` (left out of the default run, which
runs the short version in tests/test_chaos.py). ``LEDGERBUS_CHAOS_SEED=N`` replays a seed;
``LEDGERBUS_CHAOS_REPORT=FILE`` appends each run's report to FILE as one JSON line."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.chaos)
