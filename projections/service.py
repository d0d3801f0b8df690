"""The query service: the projector answers ``q.<projection>.<op>`` requests over NATS.

Requests and replies are JSON. Every reply carries ``position`` (the last applied AUDIT
sequence), so a caller knows how fresh the answer is. Served in a queue group, so
several projectors can share the load.
"""

from __future__ import annotations

import sqlite3
from typing import Any

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


class TasksList(msgspec.Struct, forbid_unknown_fields=True):
    """``q.tasks.list``"""

    status: str | None = None
    limit: int = 100


class TasksGet(msgspec.Struct, forbid_unknown_fields=True):
    """``q.tasks.get``"""

    task_id: str


class AgentsList(msgspec.Struct, forbid_unknown_fields=True):
    """``q.agents.list``"""


class ProjectionsDigest(msgspec.Struct, forbid_unknown_fields=True):
    """``q.projections.digest``: the position and sha256 of every projection table."""


REQUESTS: dict[str, type[msgspec.Struct]] = {
    subjects.query("projections", "digest"): ProjectionsDigest,
    subjects.query("tasks", "list"): TasksList,
    subjects.query("tasks", "get"): TasksGet,
    subjects.query("agents", "list"): AgentsList,
}


async def answer(db: aiosqlite.Connection, subject: str, data: bytes) -> dict[str, Any]:
    """The reply to one query (never raises for bad input: the reply says what was wrong)."""
    kind = REQUESTS.get(subject)
    if kind is None:
        return {"ok": False, "error": f"unknown query {subject!r}; known: {', '.join(sorted(REQUESTS))}"}
    try:
        req = msgspec.json.decode(data or b"{}", type=kind)
    except (msgspec.DecodeError, RecursionError) as exc:
        return {"ok": False, "error": f"bad {subject} request: {exc or 'nested too deeply'}"}
    match req:
        case TasksList(status=status, limit=limit):
            result: Any = await queries.list_tasks(db, status, limit)
        case TasksGet(task_id=task_id):
            result = await queries.get_task(db, task_id)
            if result is None:
                return {"ok": False, "error": f"no task {task_id}", "position": await dbmod.position(db)}
        case AgentsList():
            result = await queries.list_agents(db)
        case ProjectionsDigest():
            # Read position and digest in one transaction, so they describe the same state.
            await db.execute("BEGIN")
            try:
                result = {"position": await dbmod.position(db), "digest": await dbmod.digest(db)}
            finally:
                await db.execute("COMMIT")
        case _:
            return {"ok": False, "error": f"unhandled query {subject}"}
    return {"ok": True, "position": await dbmod.position(db), "data": result}


async def serve(nc: Client, db: aiosqlite.Connection) -> Subscription:
    """Subscribe the query service in the projector queue group."""

    async def handle(msg: Msg) -> None:
        try:
            reply = await answer(db, msg.subject, msg.data)
        except (DatabaseError, sqlite3.Error) as exc:
            reply = {"ok": False, "error": f"projection database: {exc}"}
        if msg.reply:
            await msg.respond(codec.encode(reply))

    return await nc.subscribe(subjects.QUERY_ALL, queue=subjects.PROJECTOR_QUEUE, cb=handle)
