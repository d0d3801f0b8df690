"""Blocking calls on the client, for scripts and notebooks: an event loop in a thread.

::

    import ledgerbus

    with ledgerbus.connect_sync() as bus:
        print(bus.submit("echo", {"text": "hi"}).result(timeout=30))

Every method is the :class:`~ledgerbus.client.Bus` method of the same name, run to its end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Awaitable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ledgerbus.bus import events as ev
from ledgerbus.bus.records import AuditRecord
from ledgerbus.client import VERDICT_TIMEOUT_S, Bus, Outcome, Page, Row, Rows, TaskHandle, connect

T = TypeVar("T")


class SyncTaskHandle:
    """:class:`~ledgerbus.client.TaskHandle`, blocking."""

    def __init__(self, owner: SyncBus, handle: TaskHandle) -> None:
        self._owner = owner
        self.handle = handle

    @property
    def task_id(self) -> str:
        """The task's id."""
        return self.handle.task_id

    def __repr__(self) -> str:
        return f"<SyncTaskHandle {self.handle.kind} {self.task_id}>"

    def verdict(self, timeout: float | None = VERDICT_TIMEOUT_S) -> AuditRecord:
        """:meth:`TaskHandle.verdict <ledgerbus.client.TaskHandle.verdict>`."""
        return self._owner._call(self.handle.verdict(timeout))

    def result(self, timeout: float | None = None) -> Any:
        """:meth:`TaskHandle.result <ledgerbus.client.TaskHandle.result>`."""
        return self._owner._call(self.handle.result(timeout))

    def wait(self, timeout: float | None = None) -> Outcome:
        """:meth:`TaskHandle.wait <ledgerbus.client.TaskHandle.wait>`."""
        return self._owner._call(self.handle.wait(timeout))

    def cancel(self, reason: str = "") -> AuditRecord:
        """:meth:`TaskHandle.cancel <ledgerbus.client.TaskHandle.cancel>`."""
        return self._owner._call(self.handle.cancel(reason))


class SyncBus:
    """:class:`~ledgerbus.client.Bus`, blocking; :func:`connect_sync` makes one."""

    def __init__(self, **connect_args: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ledgerbus-client", daemon=True)
        self._thread.start()
        self._connection = connect(**connect_args)
        try:
            self.bus: Bus = self._call(self._connection.__aenter__())
        except BaseException:
            self._stop()
            raise

    def _call(self, awaitable: Awaitable[T]) -> T:
        async def run() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        """Drain the connection and stop the loop's thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._connection.__aexit__(None, None, None))
        finally:
            self._stop()

    def __enter__(self) -> SyncBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, skill: str, input: Mapping[str, Any] | None = None, **options: Any) -> SyncTaskHandle:
        """:meth:`Bus.submit <ledgerbus.client.Bus.submit>`."""
        return SyncTaskHandle(self, self._call(self.bus.submit(skill, input, **options)))

    def submit_plan(self, plan: ev.PlanSubmitted | Mapping[str, Any] | str | Path, **options: Any) -> SyncTaskHandle:
        """:meth:`Bus.submit_plan <ledgerbus.client.Bus.submit_plan>`."""
        return SyncTaskHandle(self, self._call(self.bus.submit_plan(plan, **options)))

    def task(self, task_id: str) -> SyncTaskHandle:
        """:meth:`Bus.task <ledgerbus.client.Bus.task>`."""
        return SyncTaskHandle(self, self.bus.task(task_id))

    def get(self, task_id: str, **options: Any) -> Row:
        """:meth:`Bus.get <ledgerbus.client.Bus.get>`."""
        return self._call(self.bus.get(task_id, **options))

    def list(self, **filters: Any) -> Page:
        """:meth:`Bus.list <ledgerbus.client.Bus.list>`."""
        return self._call(self.bus.list(**filters))

    def cancel(self, task_id: str, reason: str = "") -> AuditRecord:
        """:meth:`Bus.cancel <ledgerbus.client.Bus.cancel>`."""
        return self._call(self.bus.cancel(task_id, reason))

    def approve(self, task_id: str, reason: str = "") -> AuditRecord:
        """:meth:`Bus.approve <ledgerbus.client.Bus.approve>`."""
        return self._call(self.bus.approve(task_id, reason))

    def deny(self, task_id: str, reason: str = "") -> AuditRecord:
        """:meth:`Bus.deny <ledgerbus.client.Bus.deny>`."""
        return self._call(self.bus.deny(task_id, reason))

    def events(self, task_id: str | None = None, *, from_seq: int = 1, follow: bool = False
               ) -> Iterator[AuditRecord]:
        """:meth:`Bus.events <ledgerbus.client.Bus.events>`, one record at a time."""
        found = self.bus.events(task_id, from_seq=from_seq, follow=follow)
        assert isinstance(found, AsyncGenerator)
        try:
            while True:
                try:
                    yield self._call(found.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._call(found.aclose())

    def agents(self) -> Rows:
        """:meth:`Bus.agents <ledgerbus.client.Bus.agents>`."""
        return self._call(self.bus.agents())

    def approvals(self, *, pending_only: bool = True) -> Rows:
        """:meth:`Bus.approvals <ledgerbus.client.Bus.approvals>`."""
        return self._call(self.bus.approvals(pending_only=pending_only))

    def memory(self, agent: str) -> Row:
        """:meth:`Bus.memory <ledgerbus.client.Bus.memory>`."""
        return self._call(self.bus.memory(agent))

    def checkpoints(self, agent: str) -> Rows:
        """:meth:`Bus.checkpoints <ledgerbus.client.Bus.checkpoints>`."""
        return self._call(self.bus.checkpoints(agent))

    def shared(self, namespace: str, key: str | None = None) -> Any:
        """:meth:`Bus.shared <ledgerbus.client.Bus.shared>`."""
        return self._call(self.bus.shared(namespace, key))


def connect_sync(url: str | None = None, **options: Any) -> SyncBus:
    """:func:`~ledgerbus.client.connect`, blocking: a :class:`SyncBus` (a context manager)."""
    return SyncBus(url=url, **options)
