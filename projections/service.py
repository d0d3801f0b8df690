"""The query service: the projector answers ``q.<projection>.<op>`` requests over NATS.

Requests and replies are JSON. Every reply carries ``position`` (the last applied AUDIT
sequence), so a caller knows how fresh the answer is. Served in a queue group, so
several projectors can share the load, and answered between batches while a projector
is still catching up.

``q.audit.verdict`` with ``wait_s`` is how a writer reads its own writes: it answers as
soon as the projection has applied the record of the message ``msg_id``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import aiosqlite
import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import codec, subjects
from projections import db as dbmod
from projections import queries
from projections.errors import DatabaseError

log = structlog.get_logger(__name__)

Limit = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
MAX_WAIT_S = 30.0


class Request(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of every query's request body."""


class TasksList(Request, frozen=True):
    """``q.tasks.list``: newest first."""

    status: str | None = None
    parent_task_id: str | None = None
    limit: Limit = 100


class TasksGet(Request, frozen=True):
    """``q.tasks.get``"""

    task_id: str


class AgentsList(Request, frozen=True):
    """``q.agents.list``"""


class MemoryGet(Request, frozen=True):
    """``q.memory.get``: an agent's role, knowledge, lists and current task."""

    agent: str


class CheckpointsList(Request, frozen=True):
    """``q.checkpoints.list``"""

    agent: str


class SharedGet(Request, frozen=True):
    """``q.shared.get``: one live key of a namespace."""

    namespace: str
    key: str


class SharedList(Request, frozen=True):
    """``q.shared.list``: a namespace's live keys."""

    namespace: str


class ApprovalsList(Request, frozen=True):
    """``q.approvals.list``: held submissions (``status`` empty for all)."""

    status: str | None = "pending"


class AuditList(Request, frozen=True):
    """``q.audit.list``: the audit index, newest first, by key and/or principal."""

    key: str | None = None
    principal: str | None = None
    limit: Limit = 100


class AuditVerdict(Request, frozen=True):
    """``q.audit.verdict``: the verdict on message ``msg_id``, waiting up to ``wait_s``."""

    msg_id: str
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT_S)] = 0.0


class ProjectionsDigest(Request, frozen=True):
    """``q.projections.digest``: the position and sha256 of every projection table."""


REQUESTS: dict[str, type[Request]] = {
    subjects.query("projections", "digest"): ProjectionsDigest,
    subjects.query("tasks", "list"): TasksList,
    subjects.query("tasks", "get"): TasksGet,
    subjects.query("agents", "list"): AgentsList,
    subjects.query("memory", "get"): MemoryGet,
    subjects.query("checkpoints", "list"): CheckpointsList,
    subjects.query("shared", "get"): SharedGet,
    subjects.query("shared", "list"): SharedList,
    subjects.query("approvals", "list"): ApprovalsList,
    subjects.query("audit", "list"): AuditList,
    subjects.query("audit", "verdict"): AuditVerdict,
}


class Progress:
    """Lets a query wait until the projection moves past where it is now."""

    def __init__(self) -> None:
        self._moved = asyncio.Event()

    def advanced(self) -> None:
        """Called by the projector after each committed batch."""
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return when the next batch commits, or after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._moved.wait(), timeout)
        except TimeoutError:
            pass


Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


async def answer(
    db: aiosqlite.Connection, subject: str, data: bytes, progress: Progress | None = None, now: Clock = _now
) -> dict[str, Any]:
    """The reply to one query (never raises for bad input: the reply says what was wrong)."""
    kind = REQUESTS.get(subject)
    if kind is None:
        return {"ok": False, "error": f"unknown query {subject!r}; known: {', '.join(sorted(REQUESTS))}"}
    try:
        req = msgspec.json.decode(data or b"{}", type=kind)
    except (msgspec.DecodeError, RecursionError) as exc:
        return {"ok": False, "error": f"bad {subject} request: {exc or 'nested too deeply'}"}

    def missing(what: str) -> Callable[[], Awaitable[dict[str, Any]]]:
        async def reply() -> dict[str, Any]:
            return {"ok": False, "code": "not_found", "error": what, "position": await dbmod.position(db)}
        return reply

    result: Any
    match req:
        case TasksList(status=status, parent_task_id=parent, limit=limit):
            result = await queries.list_tasks(db, status, limit, parent)
        case TasksGet(task_id=task_id):
            result = await queries.get_task(db, task_id)
            if result is None:
                return await missing(f"no task {task_id}")()
        case AgentsList():
            result = await queries.list_agents(db)
        case MemoryGet(agent=agent):
            result = await queries.get_memory(db, agent)
        case CheckpointsList(agent=agent):
            result = await queries.list_checkpoints(db, agent)
        case SharedGet(namespace=namespace, key=key):
            result = await queries.get_shared(db, namespace, key, now())
            if result is None:
                return await missing(f"no live key {key!r} in shared namespace {namespace!r}")()
        case SharedList(namespace=namespace):
            result = await queries.list_shared(db, namespace, now())
        case ApprovalsList(status=status):
            result = await queries.list_approvals(db, status or None)
        case AuditList(key=key, principal=principal, limit=limit):
            result = await queries.list_audit(db, key, principal, limit)
        case AuditVerdict(msg_id=msg_id, wait_s=wait_s):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while (result := await queries.verdict(db, msg_id)) is None:
                left = deadline - loop.time()
                if progress is None or left <= 0:
                    return await missing(f"no audit record for message {msg_id} yet")()
                await progress.wait(left)
        case ProjectionsDigest():
            # Read position and digest in one transaction, so they describe the same state.
            await db.execute("BEGIN")
            try:
                result = {"position": await dbmod.position(db), "digest": await dbmod.digest(db),
                          "memory_list_cap": await dbmod.memory_cap(db)}
            finally:
                await db.execute("COMMIT")
        case _:
            return {"ok": False, "error": f"unhandled query {subject}"}
    return {"ok": True, "position": await dbmod.position(db), "data": result}


async def serve(nc: Client, db: aiosqlite.Connection, progress: Progress | None = None) -> Subscription:
    """Subscribe the query service in the projector queue group.

    Each request is answered in its own task, so a query waiting for a verdict never
    holds up the others.
    """
    pending: set[asyncio.Task[None]] = set()

    async def reply(msg: Msg) -> None:
        try:
            body = await answer(db, msg.subject, msg.data, progress)
        except (DatabaseError, sqlite3.Error) as exc:
            body = {"ok": False, "error": f"projection database: {exc}"}
        if msg.reply:
            await msg.respond(codec.encode(body))

    async def handle(msg: Msg) -> None:
        task = asyncio.create_task(reply(msg))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return await nc.subscribe(subjects.QUERY_ALL, queue=subjects.PROJECTOR_QUEUE, cb=handle)
