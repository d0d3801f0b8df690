"""The Celery side of ``python -m bench --only e2e``: Redis on loopback, one worker, the
same steps as ledgerbus's (docs/benchmarks.md says how it runs).

A fresh ``redis-server`` (Debian's package) on a free port without persistence, as broker
and result backend; one worker ``celery -A bench.celery_app worker --pool prefork
--concurrency 2 --without-gossip --without-mingle --without-heartbeat``; ten warm-up
``noop.delay().get()``, then ``samples`` one at a time, then ``tasks`` ``noop.delay()``
followed by ``.get()`` on each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import procs
from bench.common import SCRIPTS, WARMUP, BenchError, free_port, pauses, percentile


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A fresh ``redis-server`` on a free loopback port, no persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found (Debian: apt-get install -y redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", tmp, "--daemonize", "no"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        assert proc.stdout is not None
        try:
            # Read its log until it says it is ready (no sleeps); a timer ends a silent hang.
            watchdog = threading.Timer(30, proc.kill)
            watchdog.start()
            lines = []
            for raw in proc.stdout:
                lines.append(raw.decode(errors="replace").rstrip())
                if b"Ready to accept connections" in raw:
                    break
            watchdog.cancel()
            if proc.poll() is not None:
                raise BenchError("redis-server did not start:\n" + "\n".join(lines[-10:]))
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            procs.stop(proc, signal.SIGTERM, 30, "redis-server")


CELERY_PACKAGES = frozenset({"celery", "kombu", "billiard", "amqp", "vine", "redis"})
"""Where an error of Celery's or of the clients under it comes from (they share no root class)."""


def from_celery(exc: BaseException) -> bool:
    """Whether ``exc`` was raised as one of Celery's (or Redis's, kombu's...) own errors."""
    return type(exc).__module__.partition(".")[0] in CELERY_PACKAGES


@contextlib.contextmanager
def labelled(log: Path, everything: bool) -> Iterator[None]:
    """Report an error of Celery's as a :class:`BenchError` with the worker's log; with
    ``everything``, any error but a :class:`BenchError` (the worker's start, where nothing
    else runs)."""
    try:
        yield
    except BenchError:
        raise
    except Exception as exc:
        if not (everything or from_celery(exc)):
            raise
        raise BenchError(f"Celery run failed: {exc!r}\n--- worker log ---\n{procs.tail(log)}") from exc


@contextlib.contextmanager
def celery(repo: Path, say: Callable[[str], None], notes: list[str]) -> Iterator[Any]:
    """Redis and one worker as the module says; yields the app's ``noop`` task once the
    worker has answered it. The worker is stopped warm on the way out (what that left is
    added to ``notes``); an error of Celery's or Redis's comes with the worker's log, any
    other error of the caller's block as it was raised (:func:`labelled`)."""
    from bench.celery_app import NOOP, URL_VARIABLE, make_app

    with redis_server() as url, tempfile.TemporaryDirectory(prefix="bench-celery-") as tmp:
        log = Path(tmp) / "worker.log"
        env = dict(os.environ, PATH=f"{SCRIPTS}{os.pathsep}{os.environ.get('PATH', '')}",
                   PYTHONPATH=str(repo), **{URL_VARIABLE: url})
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [str(SCRIPTS / "celery"), "-A", "bench.celery_app", "worker", "--pool", "prefork", "--concurrency", "2",
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
                cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        app = make_app(url)
        try:
            with labelled(log, everything=True):
                started = time.monotonic()
                noop = app.tasks[NOOP]
                # The first task completes once the worker consumes: that is its readiness.
                noop.delay().get(timeout=180)
                say(f"  worker answered {time.monotonic() - started:.1f} s after its start")
            # The caller's block may run more than Celery (bench/paired.py runs ledgerbus
            # too): only Celery's errors are Celery's there.
            with labelled(log, everything=False):
                yield noop
        finally:
            app.close()
            notes += procs.stop(worker, signal.SIGTERM, 60, "celery worker")  # warm shutdown
            notes += procs.reap(procs.pids(procs.in_session(worker.pid)), "the celery worker")


def run(repo: Path, tasks: int, samples: int, say: Callable[[str], None], paused: int = 0) -> dict[str, Any]:
    """One run of Celery with Redis: latency, after a pause, then throughput, as for ledgerbus."""
    notes: list[str] = []
    with celery(repo, say, notes) as noop:
        latencies = []
        for i in range(WARMUP + samples):
            start = time.perf_counter()
            noop.delay().get(timeout=60)
            if i >= WARMUP:
                latencies.append(time.perf_counter() - start)
        after_pause = []
        for pause in pauses(paused):
            time.sleep(pause)
            start = time.perf_counter()
            noop.delay().get(timeout=60)
            after_pause.append(time.perf_counter() - start)
        start = time.perf_counter()
        results = [noop.delay() for _ in range(tasks)]
        submitted = time.perf_counter() - start
        for result in results:
            result.get(timeout=120 + tasks * 0.1)
        elapsed = time.perf_counter() - start
    return {"tasks_per_s": tasks / elapsed, "seconds": elapsed, "submitted_per_s": tasks / submitted,
            "p50_ms": statistics.median(latencies) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "notes": notes} | ({"paused_p50_ms": statistics.median(after_pause) * 1000} if after_pause else {})


def missing() -> str | None:
    """Why the Celery side cannot run here, or None."""
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (uv sync --extra bench)"
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (Debian: apt-get install -y redis-server)"
    return None
