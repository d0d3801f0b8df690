"""What a running skill remembers and shares: ``ctx.memory``, ``ctx.shared``, ``ctx.tasks``.

Writes are events sent through the router like everything else, so they are
policy-checked and audited, and a replay of the log reproduces them. By default a
write returns once the projector has applied it (read-your-writes), and raises
:class:`WriteRejected` with the router's reason if the router refused it; pass
``wait=False`` to send and go on. Reads ask the projector's query service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client

from ledgerbus.agents.errors import AgentError
from ledgerbus.bus import paths, query
from ledgerbus.bus.errors import NotFound
from ledgerbus.bus.events import (
    DEFAULT_TASK_TIMEOUT_S,
    PLAN_SKILL,
    CheckpointRestored,
    CheckpointSaved,
    Event,
    Kept,
    MemoryWiped,
    MemoryWritten,
    PlanStep,
    PlanSubmitted,
    Replay,
    SharedWritten,
    TaskSubmitted,
    new_id,
)
from ledgerbus.bus.lifecycle import TERMINAL

if TYPE_CHECKING:
    from ledgerbus.agents.llm.replay import Recording

Send = Callable[[Event], Awaitable[None]]

VERDICT_WAIT_S = 10.0


class WriteRejected(AgentError):
    """The router refused a memory, shared-context or task write; ``code`` says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class Writer:
    """Sends events and, when asked, waits for the projection to hold their verdict."""

    def __init__(self, nc: Client, send: Send) -> None:
        self._nc = nc
        self._send = send

    async def write(self, event: Event, wait: bool) -> dict[str, Any] | None:
        await self._send(event)
        if not wait:
            return None
        try:
            verdict: dict[str, Any] = await query.ask(
                self._nc, "audit", "verdict", {"msg_id": event.id, "wait_s": VERDICT_WAIT_S},
                timeout=VERDICT_WAIT_S + 5,
            )
        except NotFound as exc:
            raise AgentError(f"no verdict on message {event.id} within {VERDICT_WAIT_S:g}s: {exc}") from exc
        if verdict["verdict"] != "accepted":
            raise WriteRejected(verdict["code"], verdict["reason"])
        return verdict

    async def ask(self, projection: str, op: str, request: dict[str, Any]) -> Any:
        return await query.ask(self._nc, projection, op, request)


class Memory:
    """``ctx.memory``: this agent's own memory."""

    def __init__(self, writer: Writer, agent: str) -> None:
        self._w = writer
        self.agent = agent

    async def get(self) -> dict[str, Any]:
        """The whole memory: role, knowledge, observations, reasoning, current task."""
        result: dict[str, Any] = await self._w.ask("memory", "get", {"agent": self.agent})
        return result

    async def recall(self, key: str, default: Any = None) -> Any:
        """One knowledge value, or ``default``."""
        found = (await self.get())["knowledge"].get(key)
        return default if found is None else found["value"]

    async def remember(self, key: str, value: Any, core: bool = False, wait: bool = True) -> None:
        """Set a knowledge key; ``core`` keys survive a wipe."""
        await self._w.write(self._event("knowledge", value, key=key, core=core), wait)

    async def forget(self, key: str, wait: bool = True) -> None:
        """Remove a knowledge key."""
        await self._w.write(self._event("knowledge", None, key=key), wait)

    async def observe(self, value: Any, wait: bool = True) -> None:
        """Append to the observations."""
        await self._w.write(self._event("observation", value), wait)

    async def reason(self, value: Any, wait: bool = True) -> None:
        """Append a step to the reasoning history."""
        await self._w.write(self._event("reasoning", value), wait)

    async def set_role(self, role: Any, wait: bool = True) -> None:
        """Set this agent's role (kept by a wipe)."""
        await self._w.write(self._event("role", role), wait)

    async def wipe(self, reason: str = "", wait: bool = True) -> None:
        """Clear the current task, lists and non-core knowledge; role and core knowledge stay."""
        await self._w.write(MemoryWiped(id=new_id(), agent=self.agent, reason=reason), wait)

    async def checkpoint(self, label: str = "", state: Any = None, checkpoint_id: str | None = None) -> str:
        """Name the memory as it is now (plus an optional ``state`` blob of the skill's own);
        returns the checkpoint id to restore later."""
        cid = checkpoint_id or new_id()[:12]
        await self._w.write(
            CheckpointSaved(id=new_id(), agent=self.agent, checkpoint_id=cid, label=label, state=state), True
        )
        return cid

    async def restore(self, checkpoint_id: str) -> None:
        """Make the memory what it was at ``checkpoint_id``."""
        await self._w.write(CheckpointRestored(id=new_id(), agent=self.agent, checkpoint_id=checkpoint_id), True)

    def _event(self, section: str, value: Any, key: str | None = None, core: bool = False) -> MemoryWritten:
        return MemoryWritten(id=new_id(), agent=self.agent, section=section, key=key, value=value,  # type: ignore[arg-type]
                             core=core)


class Shared:
    """``ctx.shared``: context shared between agents, by namespace and key."""

    def __init__(self, writer: Writer) -> None:
        self._w = writer

    async def get(self, namespace: str, key: str, default: Any = None) -> Any:
        """A live key's value, or ``default`` (absent or expired)."""
        try:
            found = await self._w.ask("shared", "get", {"namespace": namespace, "key": key})
        except NotFound:
            return default
        return found["value"]

    async def items(self, namespace: str) -> dict[str, Any]:
        """Every live key of a namespace."""
        rows = await self._w.ask("shared", "list", {"namespace": namespace})
        return {r["key"]: r["value"] for r in rows}

    async def set(self, namespace: str, key: str, value: Any, ttl_s: float | None = None, wait: bool = True) -> None:
        """Set a key, expiring ``ttl_s`` seconds after the router records the write."""
        if value is None:
            raise ValueError("a shared value cannot be null; use delete()")
        await self._w.write(SharedWritten(id=new_id(), namespace=namespace, key=key, value=value, ttl_s=ttl_s), wait)

    async def delete(self, namespace: str, key: str, wait: bool = True) -> None:
        """Delete a key."""
        await self._w.write(SharedWritten(id=new_id(), namespace=namespace, key=key), wait)


class Tasks:
    """``ctx.tasks``: hand work to other agents, and look at tasks."""

    def __init__(self, writer: Writer, parent_task_id: str, *, path: str = "", replay: Replay | None = None,
                 recording: Callable[[], Awaitable[Recording | None]] | None = None) -> None:
        self._w = writer
        self._parent = parent_task_id
        self._path = path
        self._replay = replay
        self._recording = recording
        self._submitted: dict[str, int] = {}

    def _place(self, skill: str) -> str:
        """The path the next subtask of ``skill`` gets (:mod:`bus.paths`)."""
        n = self._submitted[skill] = self._submitted.get(skill, 0) + 1
        return paths.below(self._path, skill, n)

    async def _kept(self, path: str) -> Kept | None:
        """In a fork: the source run's task at ``path``, if it had completed by the fork point."""
        if self._replay is None or self._recording is None or (recording := await self._recording()) is None:
            return None
        return recording.kept.get(path)

    async def submit(self, skill: str, input: dict[str, Any] | None = None,
                     timeout_s: float = DEFAULT_TASK_TIMEOUT_S, task_id: str | None = None,
                     handoff: bool = False) -> str:
        """Submit a subtask of the running task; returns its id once the router accepted it.

        In a fork (docs/replay.md), a subtask the source run had completed by the fork point
        is not run again: it is submitted as kept, completed at once with the source's
        output, which :meth:`wait` gives."""
        kept = await self._kept(self._place(skill))
        event = TaskSubmitted(id=new_id(), task_id=task_id or new_id(), skill=skill, input=input or {},
                              timeout_s=timeout_s, parent_task_id=self._parent, handoff=handoff, replay=self._replay,
                              kept=kept)
        await self._w.write(event, True)
        return event.task_id

    async def submit_plan(self, steps: list[PlanStep], name: str = "", task_id: str | None = None) -> str:
        """Submit a plan as a subtask of the running task; returns its id once accepted.

        The router checks it as it checks any plan (a rejection raises :class:`WriteRejected`
        with the router's reason, e.g. ``bad_plan: dependency cycle: a -> b -> a``). In a
        fork, the steps the source run had completed by the fork point are kept, with
        their outputs, and not run again."""
        place = self._place(PLAN_SKILL)
        kept = {step.id: k for step in steps
                if (k := await self._kept(paths.below(place, step.skill or "", 0, step.id))) is not None}
        event = PlanSubmitted(id=new_id(), task_id=task_id or new_id(), steps=steps, name=name[:128],
                              parent_task_id=self._parent, replay=self._replay, kept=kept)
        await self._w.write(event, True)
        return event.task_id

    async def get(self, task_id: str) -> dict[str, Any]:
        """A task as the projection has it (status, output, error, ...)."""
        result: dict[str, Any] = await self._w.ask("tasks", "get", {"task_id": task_id})
        return result

    async def wait(self, task_id: str, poll_s: float = 0.2) -> dict[str, Any]:
        """Wait until ``task_id`` has ended (completed, failed or denied) and return it.

        Bounded by the running task's own deadline, like everything a skill does. The
        waiting task holds its slot: a subtask for a skill only this agent has needs the
        agent's concurrency to be above one.
        """
        while True:
            try:
                task = await self.get(task_id)
            except NotFound:
                task = {"status": "unknown"}
            if task["status"] in TERMINAL:
                return task
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 1.5, 2.0)
