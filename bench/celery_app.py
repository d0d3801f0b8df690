"""The Celery side of the end-to-end benchmark (``bench/e2e.py``): one no-op task.

The worker is started as ``celery -A bench.celery_app worker ...``, which looks up the
module's ``app``: it is made on first access from ``BENCH_REDIS_URL``, the Redis server the
benchmark started (broker and result backend both). The benchmark's client builds its own
with :func:`make_app`, one per round, since every round gets a fresh Redis on a new port.
Everything else is Celery's default configuration.
"""

from __future__ import annotations

import functools
import os

from celery import Celery

URL_VARIABLE = "BENCH_REDIS_URL"
NOOP = "bench.noop"
"""The task's registered name, the same in the worker and the client."""


def make_app(url: str) -> Celery:
    """A Celery app on the Redis at ``url`` (broker and results), with the ``noop`` task."""
    app = Celery("bench", broker=url, backend=url)
    # Only silences Celery 5's warning about the setting's future default; no effect here.
    app.conf.broker_connection_retry_on_startup = True

    # Not shared: a shared task would be added to every app made after this one, clashing
    # with that app's own noop.
    @app.task(name=NOOP, shared=False)
    def noop() -> None:
        """Does nothing: what is measured is the queue around it."""

    return app


@functools.cache
def _worker_app() -> Celery:
    return make_app(os.environ.get(URL_VARIABLE, "redis://127.0.0.1:6379/0"))


def __getattr__(name: str) -> Celery:
    """``app``, for ``celery -A bench.celery_app``, made when Celery first asks for it."""
    if name == "app":
        return _worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
