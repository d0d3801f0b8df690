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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import aiosqlite
import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ledgerbus.bus import codec, subjects
from ledgerbus.projections import db as dbmod
from ledgerbus.projections import queries
from ledgerbus.projections.errors import DatabaseError

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
    skill: str | None = None
    agent: str | None = None
    submitted_by: str | None = None
    before_seq: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """The cursor: only tasks submitted before this log position (the ``submitted_seq`` of
    the last row of the previous page)."""
    top_level: bool = False
    """Only tasks with no parent: submissions and plans, not their steps and subtasks."""


class TasksResolve(Request, frozen=True):
    """``q.tasks.resolve``: the ids of the tasks whose id starts with ``prefix`` (at most
    ``limit``, oldest first), so that people may type a unique prefix of an id."""

    prefix: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


class TasksGet(Request, frozen=True):
    """``q.tasks.get``; ``tree``: with every descendant (plan steps, delegated subtasks)."""

    task_id: str
    tree: bool = False


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


class ProposalsList(Request, frozen=True):
    """``q.proposals.list``: agent proposals for unmatched plan steps, newest first
    (``status`` ``proposed`` or ``approved``; empty for all)."""

    status: str | None = None
    limit: Limit = 100


class ProposalsGet(Request, frozen=True):
    """``q.proposals.get``: one proposal, by the id of its ``skill_unmatched`` event."""

    proposal_id: str


class AuditList(Request, frozen=True):
    """``q.audit.list``: the audit index, newest first, by key and/or principal."""

    key: str | None = None
    principal: str | None = None
    limit: Limit = 100


class AuditVerdict(Request, frozen=True):
    """``q.audit.verdict``: the verdict on message ``msg_id``, waiting up to ``wait_s``."""

    msg_id: str
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT_S)] = 0.0


class UsageList(Request, frozen=True):
    """``q.usage.list``: usage reports, newest first, by task and/or agent."""

    task_id: str | None = None
    agent: str | None = None
    limit: Limit = 100
    tree: bool = False
    """With ``task_id``: the task and everything under it, oldest first (a run's calls)."""
    call: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{0,64}$")] = ""
    """Only the report naming this recorded call (or calls, by a prefix of their hash)."""


class UsageSummary(Request, frozen=True):
    """``q.usage.summary``: calls, failures, tokens, cost and latency per provider and model
    (of one task and its subtasks, or of everything)."""

    task_id: str | None = None


class ProjectionsDigest(Request, frozen=True):
    """``q.projections.digest``: the position and sha256 of every projection table."""


REQUESTS: dict[str, type[Request]] = {
    subjects.query("projections", "digest"): ProjectionsDigest,
    subjects.query("tasks", "list"): TasksList,
    subjects.query("tasks", "get"): TasksGet,
    subjects.query("tasks", "resolve"): TasksResolve,
    subjects.query("agents", "list"): AgentsList,
    subjects.query("memory", "get"): MemoryGet,
    subjects.query("checkpoints", "list"): CheckpointsList,
    subjects.query("shared", "get"): SharedGet,
    subjects.query("shared", "list"): SharedList,
    subjects.query("approvals", "list"): ApprovalsList,
    subjects.query("proposals", "list"): ProposalsList,
    subjects.query("proposals", "get"): ProposalsGet,
    subjects.query("audit", "list"): AuditList,
    subjects.query("audit", "verdict"): AuditVerdict,
    subjects.query("usage", "list"): UsageList,
    subjects.query("usage", "summary"): UsageSummary,
}


class Progress:
    """Lets a query wait until the projection moves past a point it has seen.

    A query takes a :meth:`mark` *before* it reads, and waits on that mark: a batch
    committed between its read and its wait has already set the mark, so the wait
    returns at once instead of missing the news.
    """

    def __init__(self) -> None:
        self._moved = asyncio.Event()

    def advanced(self) -> None:
        """Called by the projector after each committed batch."""
        self._moved.set()
        self._moved = asyncio.Event()

    def mark(self) -> asyncio.Event:
        """The event the next committed batch sets."""
        return self._moved

    async def wait(self, mark: asyncio.Event, timeout: float) -> None:
        """Return once a batch has committed since ``mark`` was taken, or after ``timeout``."""
        try:
            await asyncio.wait_for(mark.wait(), timeout)
        except TimeoutError:
            pass


Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


class Reader:
    """The query side's connection: one read transaction per answer, one answer at a time.

    Each answer reads its data and its position in the same transaction, so the position
    it reports is exactly the state the data comes from, however the projector commits
    in the meantime.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A consistent view of the database until the block ends."""
        async with self._lock:
            await self.db.execute("BEGIN")
            try:
                yield self.db
            finally:
                await self.db.execute("COMMIT")


@dataclass(frozen=True, slots=True)
class Missing:
    """A query's answer when the projection has no such thing: what was not found."""

    what: str


async def _read(db: aiosqlite.Connection, req: Request, now: datetime) -> Any:
    """The data of one query, or :class:`Missing`."""
    match req:
        case TasksList(status=status, parent_task_id=parent, limit=limit, skill=skill, agent=agent,
                       submitted_by=submitted_by, before_seq=before_seq, top_level=top_level):
            return await queries.list_tasks(db, status, limit, parent, skill=skill, agent=agent,
                                            submitted_by=submitted_by, before_seq=before_seq, top_level=top_level)
        case TasksResolve(prefix=prefix, limit=limit):
            return await queries.resolve_task(db, prefix, limit)
        case TasksGet(task_id=task_id, tree=tree):
            return await queries.get_task(db, task_id, tree) or Missing(await queries.missing_task(db, task_id))
        case AgentsList():
            return await queries.list_agents(db)
        case MemoryGet(agent=agent):
            return await queries.get_memory(db, agent)
        case CheckpointsList(agent=agent):
            return await queries.list_checkpoints(db, agent)
        case SharedGet(namespace=namespace, key=key):
            return await queries.get_shared(db, namespace, key, now) or Missing(
                f"no live key {key!r} in shared namespace {namespace!r}")
        case SharedList(namespace=namespace):
            return await queries.list_shared(db, namespace, now)
        case ApprovalsList(status=status):
            return await queries.list_approvals(db, status or None)
        case ProposalsList(status=status, limit=limit):
            return await queries.list_proposals(db, status or None, limit)
        case ProposalsGet(proposal_id=proposal_id):
            return await queries.get_proposal(db, proposal_id) or Missing(f"no proposal {proposal_id}")
        case AuditList(key=key, principal=principal, limit=limit):
            return await queries.list_audit(db, key, principal, limit)
        case AuditVerdict(msg_id=msg_id):
            return await queries.verdict(db, msg_id) or Missing(f"no audit record for message {msg_id} yet")
        case UsageList(task_id=task_id, agent=agent, limit=limit, tree=tree, call=call):
            if tree and task_id is not None:
                return await queries.run_usage(db, task_id, limit)
            if call:
                return await queries.usage_by_call(db, call, limit)
            return await queries.list_usage(db, task_id, agent, limit)
        case UsageSummary(task_id=task_id):
            return await queries.usage_summary(db, task_id)
        case ProjectionsDigest():
            return {"position": await dbmod.position(db), "digest": await dbmod.digest(db),
                    "memory_list_cap": await dbmod.memory_cap(db)}
    raise AssertionError(f"unhandled query {type(req).__name__}")


async def answer(
    reader: Reader, subject: str, data: bytes, progress: Progress | None = None, now: Clock = _now
) -> dict[str, Any]:
    """The reply to one query (never raises for bad input: the reply says what was wrong).

    ``q.audit.verdict`` with ``wait_s`` asks again after each batch the projector commits
    (``progress``) until the record is there or the wait is over.
    """
    kind = REQUESTS.get(subject)
    if kind is None:
        return {"ok": False, "error": f"unknown query {subject!r}; known: {', '.join(sorted(REQUESTS))}"}
    try:
        req = msgspec.json.decode(data or b"{}", type=kind)
    except (msgspec.DecodeError, RecursionError) as exc:
        return {"ok": False, "error": f"bad {subject} request: {exc or 'nested too deeply'}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (req.wait_s if isinstance(req, AuditVerdict) else 0.0)
    while True:
        mark = progress.mark() if progress is not None else None
        async with reader.snapshot() as db:
            result = await _read(db, req, now())
            position = await dbmod.position(db)
        left = deadline - loop.time()
        if not isinstance(result, Missing) or progress is None or mark is None or left <= 0:
            break
        await progress.wait(mark, left)
    if isinstance(result, Missing):
        return {"ok": False, "code": "not_found", "error": result.what, "position": position}
    return {"ok": True, "position": position, "data": result}


async def serve(nc: Client, db: aiosqlite.Connection, progress: Progress | None = None) -> Subscription:
    """Subscribe the query service in the projector queue group.

    Each request is answered in its own task, so a query waiting for a verdict never
    holds up the others.
    """
    pending: set[asyncio.Task[None]] = set()
    reader = Reader(db)

    async def reply(msg: Msg) -> None:
        try:
            body = await answer(reader, msg.subject, msg.data, progress)
        except (DatabaseError, sqlite3.Error) as exc:
            body = {"ok": False, "error": f"projection database: {exc}"}
        if msg.reply:
            await msg.respond(codec.encode(body))

    async def handle(msg: Msg) -> None:
        task = asyncio.create_task(reply(msg))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return await nc.subscribe(subjects.QUERY_ALL, queue=subjects.PROJECTOR_QUEUE, cb=handle)
