"""What a running process is waiting on: every asyncio task's chain of awaits, on demand.

``kill -USR1 <pid>`` makes a router, projector or agent log one ``tasks_dumped`` line
naming each of its tasks and, innermost last, the ``file:line in function`` of every
coroutine the task is suspended in. A process that has gone quiet (no batch, no error)
shows there which await it sits in, without stopping it: py-spy sees only the event loop
idling in ``epoll_wait``.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_DEPTH = 64


def awaiting(coro: Any, waiter: object = None) -> list[str]:
    """The chain a suspended coroutine (or generator) waits in, outermost first: each
    link's ``file:line in function``, then ``waiter`` (what its task waits on: a future,
    say) when given."""
    chain: list[str] = []
    link = coro
    while link is not None and len(chain) < MAX_DEPTH:
        frame = getattr(link, "cr_frame", None) or getattr(link, "gi_frame", None) or getattr(link, "ag_frame", None)
        if frame is None:
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        link = getattr(link, "cr_await", None) or getattr(link, "gi_yieldfrom", None) or getattr(link, "ag_await", None)
    if waiter is not None:
        chain.append(f"awaits {_short(waiter)}")
    return chain


def _short(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:197] + "..."


def tasks(loop: asyncio.AbstractEventLoop | None = None) -> list[dict[str, Any]]:
    """Every unfinished task of ``loop`` (the running one by default): its name and chain."""
    out = []
    for task in asyncio.all_tasks(loop):
        if task.done():
            continue
        # The future a task is suspended on has no public name: asyncio's own repr
        # of a task reads the same attribute.
        out.append({"task": task.get_name(), "awaits": awaiting(task.get_coro(), getattr(task, "_fut_waiter", None))})
    return sorted(out, key=lambda t: t["task"])


def dump() -> None:
    """Log every task's chain (one ``tasks_dumped`` line)."""
    found = tasks()
    log.warning("tasks_dumped", count=len(found), tasks=found)


def on_signal(loop: asyncio.AbstractEventLoop, sig: signal.Signals = signal.SIGUSR1) -> None:
    """Dump the tasks each time the process receives ``sig``."""
    loop.add_signal_handler(sig, dump)
