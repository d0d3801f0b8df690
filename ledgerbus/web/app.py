"""The HTTP API: what :mod:`ledgerbus.client` does, for programs that do not speak NATS.

Each request carries a bearer token (``agentctl keys token add NAME``) bound to one CLI
principal; the gateway acts as that principal with the credentials the token unseals
(:mod:`ledgerbus.bus.tokens`), on a NATS connection of that principal's own. So what it
sends is checked and audited by the router under the identity of the user who asked; the
gateway has no identity of its own to lend. Errors are JSON ``{"code", "message"}`` with
the status that fits; a malformed request is a 422 naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

import nats.errors
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledgerbus.agents import discovery
from ledgerbus.bus import anchor, codec, exposition, signing, subjects, tokens
from ledgerbus.bus.errors import BusError, LedgerbusError, NotFound, QueryError, SchemaError
from ledgerbus.bus.events import (
    DEFAULT_TASK_TIMEOUT_S,
    CheckpointRestored,
    CheckpointSaved,
    MemoryWiped,
    PlanSubmitted,
    TaskSubmitted,
    new_id,
)
from ledgerbus.bus.follow import TaskView, records
from ledgerbus.bus.plan_view import PlanFileError, PlanView, parse_plan
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.bus.trace_tree import build_tree, read_trace
from ledgerbus.bus.tracing import Telemetry
from ledgerbus.client import Bus, Refused, TaskHandle, connect
from ledgerbus.projections import integrity

STATIC = FilePath(__file__).parent / "static"
"""The control center: plain HTML, CSS and JavaScript, served as they are (no build step)."""
PAGE_HEADERS = {
    # Only the gateway's own script, styles and API: a value that slipped into the page as
    # markup still could not run script or send anything elsewhere.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
AgentName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$", description="An agent's name")]

Id = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="A task id, or a unique prefix of one")]


class ApiError(Exception):
    """An error the API answers with: a status, a code and a message."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class Problem(BaseModel):
    """Every error's body."""

    code: str
    message: str


class TaskIn(BaseModel):
    """A task to submit (``POST /tasks``)."""

    model_config = ConfigDict(extra="forbid")
    skill: str = Field(min_length=1, max_length=128, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    input: dict[str, Any] = Field(default_factory=dict)
    task_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$")
    timeout_s: float = Field(default=DEFAULT_TASK_TIMEOUT_S, gt=0, le=86_400)
    retries: int = Field(default=0, ge=0, le=99)
    backoff_s: float = Field(default=1.0, ge=0, le=86_400)
    budget_tokens: int | None = Field(default=None, ge=1)
    budget_cost_usd: float | None = Field(default=None, gt=0)


class PlanIn(BaseModel):
    """A plan to submit (``POST /plans``): its steps as docs/orchestration.md describes them."""

    model_config = ConfigDict(extra="forbid")
    steps: list[dict[str, Any]] = Field(min_length=1, max_length=1000)
    name: str = ""
    task_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$")
    budget: dict[str, Any] | None = None


class Decision(BaseModel):
    """Why (recorded with the decision)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=4096)


class PlanText(BaseModel):
    """A plan file's text, YAML or JSON (``POST /plans/check``)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=1_000_000)


class CheckpointIn(BaseModel):
    """A checkpoint to save: a name for people, and its id (default: a fresh one)."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(default="", max_length=256)
    checkpoint_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class Submitted(BaseModel):
    """A submission the router accepted (follow ``/tasks/{id}/events`` for the rest), or
    one INGRESS holds for a router to decide (``audit_seq`` null)."""

    task_id: str
    status: Literal["submitted"] = "submitted"
    ingress_seq: int
    audit_seq: int | None = None
    """The router's record of it: from then on ``GET /tasks/{id}`` knows the task."""
    code: str = ""
    """``ok``, or why it waits (``approval_requested``, ``awaiting_match``, ``no_agent``)."""


VERDICT_WAIT_S = 5.0
"""How long ``POST /tasks`` waits for the router's verdict before it answers without one."""


class Page(BaseModel):
    """Tasks, newest first; pass ``next`` as ``before`` for the next page."""

    items: list[dict[str, Any]]
    next: int | None


class Sessions:
    """One client per token in use, on a connection of the token's principal; a token's
    connection is closed once the token is revoked. The gateway's own spans (``web.submit``,
    the root of a task submitted over HTTP) go to TRACES on the newest open connection."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self._open: dict[str, tuple[Bus, AsyncExitStack]] = {}
        self._lock = asyncio.Lock()
        self._tokens: dict[str, tokens.Token] = {}
        self._mtime: float | None = None

    def _current(self) -> dict[str, tokens.Token]:
        """The token file as it is now (re-read when it changes: a revocation is at once)."""
        path = self.settings.auth_dir / tokens.TOKENS_FILE
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self._tokens, self._mtime = tokens.load(self.settings.auth_dir), mtime
        return self._tokens

    async def bus_for(self, token: str) -> Bus:
        """The client acting as the token's principal; 401 for any token that opens nothing."""
        current = self._current()
        async with self._lock:
            for gone in [i for i in self._open if i not in current]:  # revoked: its connection goes too
                await self._close(gone)
        opened = tokens.open_token(current, token)
        if opened is None:
            raise ApiError(401, "unauthorized", "the bearer token is not valid (unknown, revoked or malformed)")
        entry, creds = opened
        async with self._lock:
            if entry.id not in self._open:
                settings = self.settings.replace(user=creds.user, password=creds.password,
                                                 connect_timeout_s=min(self.settings.connect_timeout_s, 5.0))
                stack = AsyncExitStack()
                bus = await stack.enter_async_context(
                    connect(settings=settings, name=entry.principal.removeprefix("cli-"), span_name="web.submit",
                            client_name=f"ledgerbus-web-{entry.principal}"))
                self._open[entry.id] = (bus, stack)
                if self.telemetry is not None:
                    self.telemetry.attach(bus.nc, entry.principal)
            return self._open[entry.id][0]

    async def _close(self, token_id: str) -> None:
        bus, stack = self._open.pop(token_id)
        if self.telemetry is not None:
            await self.telemetry.flush()  # spans waiting go out on this connection, if it carried them
            if self._open:
                newest = next(reversed(self._open.values()))[0]
                self.telemetry.attach(newest.nc, newest.principal.token)
        await stack.aclose()

    async def close(self) -> None:
        """Drain every connection (the gateway is stopping)."""
        while self._open:
            await self._close(next(iter(self._open)))


async def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Bus:
    """The client acting as the bearer token's principal (the dependency of every call)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send `Authorization: Bearer <token>` (agentctl keys token add NAME)")
    sessions: Sessions = request.app.state.sessions
    try:
        return await sessions.bus_for(token.strip())
    except LedgerbusError as exc:
        raise ApiError(503, "bus_unavailable", str(exc)) from exc


Caller = Annotated[Bus, Depends(caller)]


def create_app(settings: Settings, telemetry: Telemetry | None = None) -> FastAPI:
    """The gateway's ASGI app for ``settings`` (the project's auth dir holds the tokens);
    ``telemetry``: this process's, whose spans go to TRACES over the sessions' connections."""
    sessions = Sessions(settings, telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sessions.close()

    app = FastAPI(title="ledgerbus", version="1", lifespan=lifespan,
                  description="The ledgerbus HTTP API: tasks, plans, approvals, agents and the audit log, "
                              "each request as the principal its bearer token is bound to.",
                  responses={401: {"model": Problem}, 422: {"model": Problem}})
    app.state.sessions = sessions

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"code": exc.code, "message": exc.message, **exc.extra}, status_code=exc.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        return JSONResponse({"code": "invalid_request", "message": f"{first['field']}: {first['message']}",
                             "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body that is not JSON: bad input, like any other
            return JSONResponse({"code": "invalid_request", "message": f"body: {exc.detail}"}, status_code=422)
        return JSONResponse({"code": "not_found" if exc.status_code == 404 else "http_error",
                             "message": str(exc.detail)}, status_code=exc.status_code)

    async def call(body: Callable[[], Awaitable[Any]]) -> Any:
        """Run one client call, turning the client's errors into the API's."""
        try:
            return await body()
        except SchemaError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        except NotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from exc
        except Refused as exc:
            raise ApiError(409, exc.record.code, exc.record.reason, audit_seq=exc.record.seq) from exc
        except TimeoutError as exc:
            raise ApiError(504, "timeout", "no verdict from the router in time") from exc
        except (QueryError, BusError, nats.errors.Error) as exc:
            raise ApiError(503, "bus_unavailable", str(exc) or type(exc).__name__) from exc

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        """The gateway process is up."""
        return {"ok": True}

    @app.get("/readyz", tags=["health"], responses={503: {"model": Problem}})
    async def readyz() -> dict[str, bool]:
        """The gateway reaches the NATS server (it can serve requests)."""
        host, _, port = settings.servers[0].rpartition("//")[2].rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host or "127.0.0.1", int(port or 4222)), 2)
            writer.close()
        except (OSError, TimeoutError, ValueError) as exc:
            raise ApiError(503, "bus_unavailable", f"{settings.servers[0]}: {exc}") from exc
        return {"ok": True}

    async def decided(handle: TaskHandle) -> Submitted:
        """Answer a submission once the router has recorded it, so that a read right after
        finds the task (it did not: ``GET /tasks/{id}`` said 404 while the router had yet to
        decide), and a refusal comes back here, with its code. Without a verdict in
        :data:`VERDICT_WAIT_S` (no router running) the submission waits in INGRESS."""
        async def verdict() -> AuditRecord | None:
            try:
                return await handle.verdict(VERDICT_WAIT_S)
            except TimeoutError:
                return None

        record = await call(verdict)
        if record is None:
            return Submitted(task_id=handle.task_id, ingress_seq=handle.ingress_seq)
        if not record.accepted:
            raise ApiError(409, record.code, record.reason, audit_seq=record.seq, task_id=handle.task_id)
        return Submitted(task_id=handle.task_id, ingress_seq=handle.ingress_seq, audit_seq=record.seq,
                         code=record.code)

    @app.post("/tasks", status_code=202, tags=["tasks"], response_model=Submitted,
              responses={409: {"model": Problem}})
    async def submit_task(task: TaskIn, bus: Caller) -> Submitted:
        """Submit a task; answered once the router has accepted it (409 if it refused)."""
        handle = await call(lambda: bus.submit(
            task.skill, task.input, task_id=task.task_id, timeout_s=task.timeout_s, retries=task.retries,
            backoff_s=task.backoff_s, budget_tokens=task.budget_tokens, budget_cost_usd=task.budget_cost_usd))
        return await decided(handle)

    @app.post("/plans", status_code=202, tags=["tasks"], response_model=Submitted,
              responses={409: {"model": Problem}})
    async def submit_plan(plan: PlanIn, bus: Caller) -> Submitted:
        """Submit a plan (a DAG of steps); answered as ``POST /tasks`` is."""
        body = plan.model_dump(exclude_none=True)
        handle = await call(lambda: bus.submit_plan(body))
        return await decided(handle)

    @app.get("/tasks", tags=["tasks"], response_model=Page)
    async def list_tasks(
        bus: Caller, status: str | None = None, skill: str | None = None, agent: str | None = None,
        submitted_by: str | None = None, parent: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50, before: Annotated[int | None, Query(ge=1)] = None,
        top_level: bool = False,
    ) -> Page:
        """Tasks, newest first, filtered (``top_level``: only those with no parent, not
        plan steps and subtasks); ``before`` is the previous page's ``next``."""
        page = await call(lambda: bus.list(status=status, skill=skill, agent=agent, submitted_by=submitted_by,
                                           parent=parent, limit=limit, before=before, top_level=top_level))
        return Page(items=page.items, next=page.next)

    @app.get("/tasks/{task_id}", tags=["tasks"], responses={404: {"model": Problem}})
    async def get_task(task_id: Id, bus: Caller, history: bool = False) -> dict[str, Any]:
        """One task with its subtasks (``children``), and with ``history`` its audit records."""
        task: dict[str, Any] = await call(lambda: bus.get(task_id, tree=True, history=history))
        return task

    def decision(verb: Literal["cancel", "approve", "deny"]) -> Callable[..., Awaitable[dict[str, Any]]]:
        async def decide(task_id: Id, bus: Caller, body: Decision | None = None) -> dict[str, Any]:
            method = {"cancel": bus.cancel, "approve": bus.approve, "deny": bus.deny}[verb]
            record = await call(lambda: method(task_id, (body or Decision()).reason))
            data: dict[str, Any] = codec.to_builtins(record)
            return data
        decide.__doc__ = {"cancel": "Cancel the task and everything under it.",
                          "approve": "Let a task held for approval run.",
                          "deny": "Refuse a task held for approval."}[verb]
        return decide

    for verb in ("cancel", "approve", "deny"):
        app.post(f"/tasks/{{task_id}}/{verb}", tags=["tasks"], name=f"{verb}_task",
                 responses={404: {"model": Problem}, 409: {"model": Problem}})(decision(verb))  # type: ignore[arg-type]

    @app.get("/tasks/{task_id}/events", tags=["tasks"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": Problem}})
    async def task_events(task_id: Id, bus: Caller) -> StreamingResponse:
        """The task's audit records as server-sent events (``event: record``, the stored
        JSON as ``data``), from its first record, until the task ends."""
        full = (await call(lambda: bus.get(task_id, tree=False)))["task_id"]  # 404 for an id nobody knows

        async def stream() -> AsyncIterator[bytes]:
            view: TaskView | PlanView | None = None
            async for record, data in bus.stored(full, follow=True):
                event = record.event
                if view is None and isinstance(event, PlanSubmitted):
                    view = PlanView(event)
                elif view is None and isinstance(event, TaskSubmitted):
                    view = TaskView(full, record.msg_id, skill=event.skill)
                if view is not None:
                    view.apply(record)
                yield b"event: record\nid: %d\ndata: " % record.seq + data + b"\n\n"
                if view is not None and view.terminal:
                    break
            yield b"event: end\ndata: {}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/agents", tags=["agents"])
    async def agents(bus: Caller) -> list[dict[str, Any]]:
        """Every agent that joined: status, skills, counts; live ones' replicas, load, heartbeat."""
        rows: list[dict[str, Any]] = await call(bus.agents)
        return rows

    @app.get("/approvals", tags=["tasks"])
    async def approvals(bus: Caller, all: bool = False) -> list[dict[str, Any]]:
        """Tasks held for approval, oldest first (decided ones too, with ``all``)."""
        rows: list[dict[str, Any]] = await call(lambda: bus.approvals(pending_only=not all))
        return rows

    @app.get("/agents/{agent}/memory", tags=["agents"])
    async def memory(agent: AgentName, bus: Caller) -> dict[str, Any]:
        """An agent's memory: role, knowledge, observations, reasoning, current task."""
        row: dict[str, Any] = await call(lambda: bus.memory(agent))
        return row

    @app.get("/agents/{agent}/checkpoints", tags=["agents"])
    async def checkpoints(agent: AgentName, bus: Caller) -> list[dict[str, Any]]:
        """An agent's memory checkpoints."""
        rows: list[dict[str, Any]] = await call(lambda: bus.checkpoints(agent))
        return rows

    @app.get("/audit", tags=["audit"], responses={404: {"model": Problem}})
    async def audit(
        bus: Caller,
        from_seq: Annotated[int, Query(ge=1, description="Oldest first from this sequence")] = 1,
        order: Literal["asc", "desc"] = "asc",
        before: Annotated[int | None, Query(ge=1, description="With order=desc: below this sequence")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        kind: Annotated[str | None, Query(pattern=r"^[a-z_]{1,64}$")] = None,
        verdict: Literal["accepted", "rejected"] | None = None,
        principal: Annotated[str | None, Query(max_length=128)] = None,
        key: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,128}$",
                                         description="A task id (or a unique prefix) or an agent's name")] = None,
    ) -> list[dict[str, Any]]:
        """Audit records as stored, at most ``limit``: oldest first from ``from_seq``, or with
        ``order=desc`` newest first (below ``before``: the last page's smallest ``seq``).
        ``kind``, ``verdict`` and ``key`` filter on the server's subjects, ``principal`` on
        the records read."""

        async def read() -> list[dict[str, Any]]:
            # A task's id or unique prefix; any other key (an agent's name) is taken as it is.
            whose = await bus.resolve(key) if key is not None else None
            filt = f"audit.{verdict or '*'}.{kind or '*'}.{whose or '*'}"
            js = bus.nc.jetstream(timeout=10)
            if order == "asc":
                return await _read_audit(js, filt, from_seq, None, limit, principal)
            head = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
            end = min(head, before - 1 if before is not None else head)
            found: list[dict[str, Any]] = []
            window = max(256, 2 * limit)
            while end >= 1 and len(found) < limit:
                start = max(1, end - window + 1)
                found.extend(reversed(await _read_audit(js, filt, start, end, None, principal)))
                end, window = start - 1, window * 2
            return found[:limit]

        return await call(read)

    @app.get("/audit/verify", tags=["audit"])
    async def verify(bus: Caller, projections: bool = True) -> dict[str, Any]:
        """``agentctl audit verify --json``: the chain from the first record (hashes,
        sequences, signed checkpoints, anchors) and, with ``projections``, the live
        projection against a rebuild; ``ok`` and the first bad sequence."""
        key_file = signing.public_path(settings.router_key_path)
        public_key = signing.load_public(key_file) if key_file.exists() else None

        async def run() -> dict[str, Any]:
            report, findings = await integrity.check(
                bus.nc, public_key=public_key, max_gap=settings.checkpoint_every + settings.router_batch,
                anchor_file=anchor.file_path(settings.router_key_path), projections=projections, settings=settings)
            return integrity.as_json(report, findings)

        return await call(run)

    @app.get("/tasks/{task_id}/trace", tags=["tasks"], responses={404: {"model": Problem}})
    async def task_trace(task_id: Id, bus: Caller) -> dict[str, Any]:
        """The task's trace from the TRACES stream, depth first, each span with its
        ``depth``, ``service`` and whether it is on the ``critical`` path."""
        task = await call(lambda: bus.get(task_id, tree=False))
        trace_id = task.get("trace_id") or ""
        batches = await call(lambda: read_trace(bus.nc.jetstream(timeout=10), trace_id)) if trace_id else []
        tree = build_tree(trace_id, batches)
        depth: dict[str, int] = {}
        spans = []
        for node in tree.walk():
            span = node.span
            depth[span.span_id] = depth.get(span.parent_span_id, -1) + 1 if not node.orphan else 0
            spans.append({"span_id": span.span_id, "parent_span_id": span.parent_span_id, "name": span.name,
                          "service": node.service, "start_ns": span.start_ns, "end_ns": span.end_ns,
                          "depth": depth[span.span_id], "critical": node.critical, "failed": span.failed,
                          "status_message": span.status_message, "attributes": span.attributes})
        return {"trace_id": trace_id, "task_id": task["task_id"], "services": tree.services, "spans": spans}

    @app.post("/plans/check", tags=["tasks"], responses={422: {"model": Problem}})
    async def check_plan(body: PlanText, bus: Caller) -> dict[str, Any]:
        """Read a plan file's text (YAML or JSON) and check it as far as needs no bus;
        answers the plan as ``POST /plans`` takes it, or 422 saying what is wrong."""
        try:
            plan = parse_plan(body.text)
        except PlanFileError as exc:
            raise ApiError(422, "invalid_plan", str(exc).removeprefix("plan: ")) from exc
        data: dict[str, Any] = codec.to_builtins(plan)
        # What POST /plans takes: not the log's own fields, nor a fork's (agentctl fork makes those).
        return {k: v for k, v in data.items() if k not in ("kind", "id", "task_id", "replay", "kept") and v is not None}

    @app.get("/skills", tags=["agents"])
    async def skills(bus: Caller) -> list[dict[str, Any]]:
        """The skills installed beside the gateway, with their input and output JSON schemas."""
        found = await asyncio.to_thread(discovery.catalog)
        return [info.describe() for info in found.values()]

    @app.get("/me", tags=["health"])
    async def me(bus: Caller) -> dict[str, str]:
        """Who the bearer token acts as."""
        return {"principal": bus.principal.token, "name": bus.principal.name}

    def agent_action(agent: str, event: Any, bus: Bus) -> Awaitable[dict[str, Any]]:
        async def send() -> dict[str, Any]:
            data: dict[str, Any] = codec.to_builtins(await bus.send(event, agent))
            return data
        return call(send)

    @app.post("/agents/{agent}/memory/wipe", tags=["agents"], responses={409: {"model": Problem}})
    async def wipe(agent: AgentName, bus: Caller, body: Decision | None = None) -> dict[str, Any]:
        """Clear the agent's current task, observations, reasoning and non-core knowledge
        (its role and core knowledge stay); answers the router's audit record."""
        return await agent_action(agent, MemoryWiped(id=new_id(), agent=agent, reason=(body or Decision()).reason), bus)

    @app.post("/agents/{agent}/checkpoints", tags=["agents"], responses={409: {"model": Problem}})
    async def save_checkpoint(agent: AgentName, bus: Caller, body: CheckpointIn | None = None) -> dict[str, Any]:
        """Checkpoint the agent's memory as it is now (the record names ``checkpoint_id``)."""
        body = body or CheckpointIn()
        event = CheckpointSaved(id=new_id(), agent=agent, checkpoint_id=body.checkpoint_id or new_id()[:12],
                                label=body.label)
        return await agent_action(agent, event, bus)

    @app.post("/agents/{agent}/checkpoints/{checkpoint_id}/restore", tags=["agents"],
              responses={409: {"model": Problem}})
    async def restore_checkpoint(agent: AgentName, bus: Caller,
                                 checkpoint_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]) -> dict[str, Any]:
        """Make the agent's memory what it was at the checkpoint."""
        return await agent_action(agent, CheckpointRestored(id=new_id(), agent=agent, checkpoint_id=checkpoint_id), bus)

    app.mount("/ui", _Static(directory=STATIC), name="ui")

    @app.get("/", include_in_schema=False)
    async def control_center() -> FileResponse:
        """The control center's page (it asks for a token and uses the API above)."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache", **PAGE_HEADERS})

    @app.get("/metrics", tags=["observability"], response_class=Response, response_model=None,
             responses={200: {"content": {exposition.CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "The Prometheus text format, version 0.0.4"},
                        503: {"model": Problem}})
    async def metrics(bus: Caller) -> Response:
        """Every live process's metrics (router, projector, agents, this gateway), each
        sample labelled ``ledgerbus_process`` and ``ledgerbus_instance``, and the sizes of
        the streams and of WORK's consumers: the one target Prometheus scrapes
        (docs/observability.md)."""
        own = telemetry.snapshots if telemetry is not None else None
        text = await call(lambda: exposition.scrape(bus.nc, own))
        return Response(text, media_type=exposition.CONTENT_TYPE)

    return app


async def _read_audit(js: Any, filt: str, start: int, end: int | None, limit: int | None,
                      principal: str | None) -> list[dict[str, Any]]:
    """Stored audit records matching ``filt`` (and ``principal``) from ``start`` up to
    ``end``, oldest first, at most ``limit``."""
    found: list[dict[str, Any]] = []
    async for record, data in records(js, filt, from_seq=start):
        if end is not None and record.seq > end:
            break
        if principal is None or record.principal == principal:
            found.append(json.loads(data))
            if limit is not None and len(found) >= limit:
                break
    return found


class _Static(StaticFiles):
    """The control center's files, revalidated at every load (by their ETag): a browser
    never runs yesterday's script against today's API after an upgrade."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
