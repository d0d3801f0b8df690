"""The packages type-check clean (house style): a regression here fails CI, not a review."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO


def test_the_packages_are_mypy_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
