"""What the end-to-end benchmarks share: their error, the scripts' directory, free ports
and percentiles."""

from __future__ import annotations

import random
import socket
import statistics
import sysconfig
from pathlib import Path

WARMUP = 10
"""Tasks each system runs one at a time before anything is measured."""
PAUSE_S = (0.2, 0.8)
"""How long the client waits before each task of the paused step: a person's task, which
finds every process idle, not the back-to-back tasks of the latency step."""
SCRIPTS = Path(sysconfig.get_path("scripts"))
"""Where this environment's console scripts are (agentctl, honcho, celery, py-spy)."""


class BenchError(Exception):
    """A run could not be measured (a process did not start, a task was rejected...)."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(samples: list[float], pct: int) -> float:
    """The ``pct``-th percentile of ``samples`` (inclusive method: within their range)."""
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def pauses(n: int, seed: int = 20) -> list[float]:
    """``n`` pauses, each uniform in :data:`PAUSE_S`, the same for every system and round."""
    rng = random.Random(seed)
    return [rng.uniform(*PAUSE_S) for _ in range(n)]
