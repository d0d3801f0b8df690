"""Stopping a task for sure: cancel it until it has ended.

One cancel is not always enough: on Python 3.11, ``asyncio.wait_for`` drops a cancellation
that arrives as the future it waits on completes (CPython gh-86296), and nats-py waits for
every request's reply that way (a KV put, an object store write, a consumer's info). The
router's lease keeper, cancelled while its renewal's reply came in, renewed and slept on,
and the router that had stepped down waited for it for ever (the chaos suite, after a
server restart).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

log = structlog.get_logger(__name__)


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again every 0.1 s while it
    runs on; an error it ended with is logged at debug, not raised."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task_stopped_with_error", task=task.get_name(), error=str(task.exception()))
