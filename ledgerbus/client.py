"""The Python client: submit tasks and plans, wait for their outcome, read what the bus knows.

::

    import ledgerbus

    async with ledgerbus.connect() as bus:
        task = await bus.submit("echo", {"text": "hi"})
        print(await task.result(timeout=30))

Everything goes through the router like any other message: the client connects as a CLI
principal (``cli-<name>``, with that principal's credentials from the project's
``var/auth``, or ``LEDGERBUS_USER``/``LEDGERBUS_PASSWORD``), so what it sends is checked and
audited under that identity. Outcomes are read from the audit log itself (no projector
needed to wait for a task); lists and lookups ask the projector's query service. ``agentctl``
is written on top of this module. See docs/client.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import msgspec
import nats.errors
from nats.aio.client import Client
from opentelemetry import trace

from ledgerbus.bus import codec, query, subjects, tracing
from ledgerbus.bus import events as ev
from ledgerbus.bus.connection import connected
from ledgerbus.bus.errors import BusError, LedgerbusError, NotFound, QueryError, SchemaError
from ledgerbus.bus.follow import TaskView, records
from ledgerbus.bus.identity import cli_name
from ledgerbus.bus.lifecycle import Status
from ledgerbus.bus.plan_view import PlanView, read_plan
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings

if TYPE_CHECKING:
    from ledgerbus.agents.llm.calls import CallRecord
    from ledgerbus.projections.fork import ForkPlan

__all__ = [
    "Bus", "Outcome", "Page", "Refused", "TaskCancelled", "TaskDenied", "TaskError", "TaskFailed", "TaskHandle",
    "TaskRejected", "TaskTimeout", "connect",
]

Row: TypeAlias = dict[str, Any]
"""A projection row as the query service returns it (JSON types; docs/client.md lists the fields)."""
Rows: TypeAlias = list[Row]

VERDICT_TIMEOUT_S = 30.0
"""How long :meth:`Bus.cancel`, :meth:`Bus.approve` and :meth:`Bus.deny` wait for the
router's verdict before they give up."""
MIN_PREFIX = 4
"""The shortest id prefix :meth:`Bus.resolve` looks up (shorter ones must be whole ids)."""


# -- errors ------------------------------------------------------------------------------


class TaskError(LedgerbusError):
    """A task did not complete; ``outcome`` says how it ended (or where it was)."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome

    @property
    def task_id(self) -> str:
        """The task's id."""
        return self.outcome.task_id


class TaskRejected(TaskError):
    """The router refused the submission (``outcome.code`` and ``outcome.reason`` say why)."""


class TaskFailed(TaskError):
    """The task failed (its retries spent), was dead-lettered, or ran out of budget."""


class TaskCancelled(TaskError):
    """The task was cancelled."""


class TaskDenied(TaskError):
    """An approver denied the task, held for approval: it never ran."""


class TaskTimeout(TaskError, TimeoutError):
    """The wait ended before the task did; the task goes on (``outcome`` is where it was)."""


class Refused(LedgerbusError):
    """The router refused a request (a cancel, an approval); ``record`` is its audit record."""

    def __init__(self, record: AuditRecord) -> None:
        super().__init__(f"refused ({record.code}): {record.reason}")
        self.record = record


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a task (or plan) stands, as its audit records tell it."""

    task_id: str
    status: Status
    output: Any = None
    error: str = ""
    code: str = ""
    """The router's code when it rejected the submission, or accepted it with a word
    (``no_agent``, ``awaiting_match``, ``awaiting_approval``)."""
    reason: str = ""
    agent: str = ""
    attempts: int = 0
    seconds: float | None = None
    warnings: tuple[str, ...] = ()
    """What the submitter should know while it waits (nobody serves the skill, ...)."""
    steps: Mapping[str, Row] = field(default_factory=dict)
    """A plan's steps by step id (status, agent, attempts, seconds, note); empty for a task."""

    @property
    def done(self) -> bool:
        """Whether the task has ended (or was rejected)."""
        return self.status in _ENDED

    @property
    def completed(self) -> bool:
        """Whether the task completed."""
        return self.status is Status.COMPLETED

    def as_json(self) -> Row:
        """The outcome as JSON types."""
        return {"task_id": self.task_id, "status": str(self.status), "output": self.output, "error": self.error,
                "code": self.code, "reason": self.reason, "agent": self.agent, "attempts": self.attempts,
                "seconds": self.seconds, "warnings": list(self.warnings), **({"steps": dict(self.steps)}
                                                                             if self.steps else {})}


_ENDED = frozenset({Status.COMPLETED, Status.FAILED, Status.DEAD_LETTERED, Status.CANCELLED, Status.DENIED,
                    Status.REJECTED})


def outcome_of(view: TaskView | PlanView) -> Outcome:
    """The :class:`Outcome` a live view stands for."""
    if isinstance(view, PlanView):
        data = view.as_json()
        return Outcome(task_id=view.plan.task_id, status=Status(view.status), output=view.output, error=view.error,
                       code=view.code, reason=view.reason, steps=data["steps"])
    return Outcome(task_id=view.task_id, status=Status(view.status), output=view.output, error=view.error,
                   code=view.code, reason=view.reason, agent=view.agent, attempts=view.attempts,
                   seconds=view.seconds, warnings=tuple(view.warnings))


def raise_for(outcome: Outcome) -> None:
    """Raise the :class:`TaskError` that fits an outcome that did not complete."""
    what = f"task {outcome.task_id}"
    match outcome.status:
        case Status.COMPLETED:
            return
        case Status.REJECTED:
            raise TaskRejected(f"{what} rejected ({outcome.code}): {outcome.reason}", outcome)
        case Status.CANCELLED:
            raise TaskCancelled(f"{what} cancelled: {outcome.error}", outcome)
        case Status.DENIED:
            raise TaskDenied(f"{what} denied: {outcome.error or outcome.reason}", outcome)
        case Status.FAILED | Status.DEAD_LETTERED:
            raise TaskFailed(f"{what} {outcome.status}: {outcome.error}", outcome)
    raise TaskTimeout(f"{what} still {outcome.status}", outcome)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list, newest first; pass ``next`` as ``before`` for the next page
    (``None``: this was the last)."""

    items: Rows
    next: int | None


def task_submission(
    skill: str, input: Mapping[str, Any] | None = None, *, task_id: str | None = None,
    timeout_s: float = ev.DEFAULT_TASK_TIMEOUT_S, retries: int = 0, backoff_s: float = 1.0,
    budget_tokens: int | None = None, budget_cost_usd: float | None = None,
) -> ev.TaskSubmitted:
    """The ``task_submitted`` event :meth:`Bus.submit` sends, checked against the router's
    own schema: a malformed field raises :class:`~ledgerbus.bus.errors.SchemaError` naming it."""
    data: Row = {"kind": "task_submitted", "id": ev.new_id(), "task_id": task_id or ev.new_id(), "skill": skill,
                 "input": dict(input or {}), "timeout_s": timeout_s}
    if budget_tokens is not None or budget_cost_usd is not None:
        data["budget"] = {"tokens": budget_tokens, "cost_usd": budget_cost_usd}
    if retries:
        data["retry"] = {"max_attempts": retries + 1, "backoff_s": backoff_s}
    event = codec.decode_event(codec.encode(data))
    assert isinstance(event, ev.TaskSubmitted)
    return event


# -- handles -----------------------------------------------------------------------------


class TaskHandle:
    """A submitted task or plan: wait for it, follow it, cancel it."""

    def __init__(self, bus: Bus, submission: ev.TaskSubmitted | ev.PlanSubmitted, ingress_seq: int) -> None:
        self._bus = bus
        self.submission = submission
        """The event as sent (its ``id`` is the message id the router's verdict names)."""
        self.ingress_seq = ingress_seq
        """The submission's position in INGRESS (the router's input stream)."""

    @property
    def task_id(self) -> str:
        """The task's id (a plan's steps are ``<task_id>-<step id>``)."""
        return self.submission.task_id

    @property
    def kind(self) -> Literal["task", "plan"]:
        """``plan`` for a submitted plan, else ``task``."""
        return "plan" if isinstance(self.submission, ev.PlanSubmitted) else "task"

    def __repr__(self) -> str:
        return f"<TaskHandle {self.kind} {self.task_id}>"

    def view(self) -> TaskView | PlanView:
        """A new view of this submission, as :meth:`watch` folds its records into."""
        if isinstance(self.submission, ev.PlanSubmitted):
            return PlanView(self.submission)
        return TaskView(self.submission.task_id, self.submission.id, skill=self.submission.skill)

    async def watch(self, view: TaskView | PlanView | None = None) -> AsyncIterator[TaskView | PlanView]:
        """The task's live view (``view``, else a new one) after each of its audit records
        (a plan's also after each record of its steps), until it ends. The log is read from
        this submission's first record, so nothing is missed however late this starts."""
        js = self._bus.nc.jetstream(timeout=10)
        view = view if view is not None else self.view()
        if isinstance(view, PlanView):
            async for plan in _follow_plan(js, view):
                yield plan
            return
        task = view
        async with contextlib.aclosing(records(js, subjects.audit_for_key(task.task_id), follow=True)) as follow:
            async for record, _ in follow:
                task.apply(record)
                yield task
                if task.terminal:
                    return

    async def wait(self, timeout: float | None = None) -> Outcome:
        """Wait until the task ends and return how (never raises for a task that failed);
        raises :class:`TaskTimeout` after ``timeout`` seconds."""
        view: TaskView | PlanView | None = None
        try:
            async with asyncio.timeout(timeout):
                async for view in self.watch():
                    pass
        except TimeoutError:
            where = outcome_of(view) if view is not None else Outcome(self.task_id, Status.SUBMITTED)
            raise TaskTimeout(f"task {self.task_id} still {where.status} after {timeout:g}s", where) from None
        assert view is not None
        return outcome_of(view)

    async def result(self, timeout: float | None = None) -> Any:
        """The task's output once it completes; raises :class:`TaskRejected`,
        :class:`TaskFailed`, :class:`TaskCancelled`, :class:`TaskDenied` or
        :class:`TaskTimeout` otherwise."""
        outcome = await self.wait(timeout)
        raise_for(outcome)
        return outcome.output

    async def verdict(self, timeout: float | None = VERDICT_TIMEOUT_S) -> AuditRecord:
        """The router's audit record on this submission, accepted or refused (its ``code``
        says why it waits or was refused). From then on every read of the task knows it
        (:meth:`Bus.get`, ``GET /tasks/{id}``); before, only INGRESS holds it. Raises
        :class:`TimeoutError` without one in ``timeout`` seconds (no router running:
        INGRESS keeps the submission until one is)."""
        return await _verdict(self._bus.nc.jetstream(timeout=10), self.task_id, self.submission.id, timeout)

    async def events(self) -> AsyncIterator[AuditRecord]:
        """The task's audit records so far and as they come (until the iterator is closed)."""
        async for record in self._bus.events(self.task_id, follow=True):
            yield record

    async def cancel(self, reason: str = "") -> AuditRecord:
        """Cancel the task and everything under it (:meth:`Bus.cancel`)."""
        return await self._bus.cancel(self.task_id, reason)


async def _verdict(js: Any, key: str, msg_id: str, timeout: float | None, from_seq: int = 1) -> AuditRecord:
    """The router's record on message ``msg_id`` about ``key``, read from ``from_seq`` on
    (:class:`TimeoutError` after ``timeout`` seconds)."""
    async with asyncio.timeout(timeout):
        async with contextlib.aclosing(records(js, subjects.audit_for_key(key), from_seq=from_seq,
                                               follow=True)) as follow:
            async for record, _ in follow:
                if record.msg_id == msg_id:
                    return record
    raise AssertionError("unreachable: a followed log does not end")


async def _follow_plan(js: Any, view: PlanView) -> AsyncIterator[PlanView]:
    """The plan's verdict, then every record of the plan and its steps from there."""
    start = 0
    async with contextlib.aclosing(records(js, subjects.audit_for_key(view.plan.task_id), follow=True)) as verdicts:
        async for record, _ in verdicts:
            view.apply(record)
            if view.status != Status.SUBMITTED:
                start = record.seq
                break
    yield view
    if view.terminal:
        return
    async with contextlib.aclosing(records(js, subjects.AUDIT_ALL, from_seq=start + 1, follow=True)) as follow:
        async for record, _ in follow:
            if record.key in view.keys:
                view.apply(record)
                yield view
            if view.terminal:
                return


# -- the client --------------------------------------------------------------------------


class Bus:
    """A connection to the bus as one CLI principal (:func:`connect` makes one).

    ``reader`` answers queries from a local projection file instead of the projector
    (``agentctl --db``); such a bus can read but not send.
    """

    def __init__(self, nc: Client | None, settings: Settings, who: subjects.Principal,
                 reader: Any = None, span_name: str = "ledgerbus.submit") -> None:
        self._nc = nc
        self.settings = settings
        self.principal = who
        """The principal everything is sent as (``cli-<name>``)."""
        self._reader = reader
        self._span_name = span_name

    @property
    def nc(self) -> Client:
        """The NATS connection (for what the client does not cover)."""
        if self._nc is None:
            raise BusError("this client reads a local projection file: it is not connected to the bus")
        return self._nc

    # -- sending ---------------------------------------------------------------------------

    async def submit(
        self, skill: str, input: Mapping[str, Any] | None = None, *, task_id: str | None = None,
        timeout_s: float = ev.DEFAULT_TASK_TIMEOUT_S, retries: int = 0, backoff_s: float = 1.0,
        budget_tokens: int | None = None, budget_cost_usd: float | None = None,
    ) -> TaskHandle:
        """Submit one task for ``skill``. Returns once INGRESS has it (not once the router
        decided: :meth:`TaskHandle.result` waits for that); a malformed request raises
        :class:`~ledgerbus.bus.errors.SchemaError` naming the field, before anything is sent."""
        return await self.send_submission(task_submission(
            skill, input, task_id=task_id, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
            budget_tokens=budget_tokens, budget_cost_usd=budget_cost_usd))

    async def submit_plan(
        self, plan: ev.PlanSubmitted | Mapping[str, Any] | str | Path, *, task_id: str | None = None,
        budget_tokens: int | None = None, budget_cost_usd: float | None = None,
    ) -> TaskHandle:
        """Submit a plan: a :class:`~ledgerbus.bus.events.PlanSubmitted`, a mapping with its
        fields (``steps``, ``name``, ``budget``), or the path of a YAML or JSON plan file."""
        if isinstance(plan, (str, Path)):
            event = read_plan(str(plan), task_id)
        elif isinstance(plan, ev.PlanSubmitted):
            event = plan if task_id is None else msgspec.structs.replace(plan, task_id=task_id)
        else:
            body = {"kind": "plan_submitted", "id": ev.new_id(), **plan}
            body["task_id"] = task_id or body.get("task_id") or ev.new_id()
            decoded = codec.decode_event(codec.encode(body))
            assert isinstance(decoded, ev.PlanSubmitted)
            event = decoded
        if budget_tokens is not None or budget_cost_usd is not None:
            if event.budget is not None:
                raise SchemaError("the plan sets its budget already: give it there or here, not both")
            event = msgspec.structs.replace(event, budget=ev.Budget(tokens=budget_tokens, cost_usd=budget_cost_usd))
        return await self.send_submission(event)

    async def send_submission(self, event: ev.TaskSubmitted | ev.PlanSubmitted) -> TaskHandle:
        """Send a ready-made submission, in the producer span that roots the task's trace."""
        subject = subjects.ingress(self.principal, ev.kind_of(type(event)))
        skill = event.skill if isinstance(event, ev.TaskSubmitted) else ev.PLAN_SKILL
        with trace.get_tracer("ledgerbus.client").start_as_current_span(
            self._span_name, kind=trace.SpanKind.PRODUCER,
            attributes={**tracing.messaging(subject, "publish", event.id), "ledgerbus.task_id": event.task_id,
                        "ledgerbus.skill": skill},
        ):
            headers = tracing.inject({subjects.HDR_MSG_ID: event.id})
            try:
                ack = await self.nc.jetstream(timeout=10).publish(subject, codec.encode(event), headers=headers)
            except nats.errors.NoRespondersError as exc:
                raise BusError("no INGRESS stream: is the router running?") from exc
        return TaskHandle(self, event, ack.seq)

    def task(self, task_id: str, submission_id: str | None = None) -> TaskHandle:
        """A handle on a task submitted earlier (by anyone), to wait for it or follow it.
        Without ``submission_id`` it follows the task's first submission."""
        return _LateHandle(self, task_id, submission_id)

    async def send(self, event: ev.Event, key: str, timeout: float = VERDICT_TIMEOUT_S) -> AuditRecord:
        """Send any event this principal may send and return the router's audit record on it
        (raises :class:`Refused` if the router refused it, :class:`TimeoutError` without a
        verdict in ``timeout`` seconds)."""
        codec.decode_event(codec.encode(event))  # the router's own schema: a typo is named here
        js = self.nc.jetstream(timeout=10)
        head = (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
        try:
            await js.publish(subjects.ingress(self.principal, ev.kind_of(type(event))), codec.encode(event),
                             headers={subjects.HDR_MSG_ID: event.id})
        except (TimeoutError, nats.errors.NoRespondersError) as exc:
            raise BusError("INGRESS did not acknowledge: is the router running?") from exc
        record = await _verdict(js, key, event.id, timeout, from_seq=head + 1)
        if not record.accepted:
            raise Refused(record)
        return record

    async def cancel(self, task_id: str, reason: str = "") -> AuditRecord:
        """Cancel a task and everything under it (plan steps, delegated subtasks)."""
        task_id = await self.resolve(task_id)
        return await self.send(ev.TaskCancelled(id=ev.new_id(), task_id=task_id, reason=reason), task_id)

    async def approve(self, task_id: str, reason: str = "") -> AuditRecord:
        """Let a task held for approval run."""
        task_id = await self.resolve(task_id)
        return await self.send(ev.TaskApproved(id=ev.new_id(), task_id=task_id, reason=reason), task_id)

    async def deny(self, task_id: str, reason: str = "") -> AuditRecord:
        """Refuse a task held for approval: it never runs."""
        task_id = await self.resolve(task_id)
        return await self.send(ev.TaskDenied(id=ev.new_id(), task_id=task_id, reason=reason), task_id)

    async def fork(self, task_id: str, *, at_seq: int, live: bool = False,
                   match: Literal["strict", "lenient"] = "lenient") -> tuple[ForkPlan, TaskHandle]:
        """Start a new run of ``task_id``'s tree as it stood at log position ``at_seq``
        (docs/replay.md): what had completed keeps its output, the rest runs again under new
        ids, its LLM calls answered from the source run's recordings (``live``: those made
        after ``at_seq`` go to the model), the agents' memory restored to ``at_seq``. Every
        step is a record; the original run is not touched. Raises
        :class:`~ledgerbus.projections.fork.ForkError` for a fork that cannot be made."""
        from ledgerbus.agents.llm import calls
        from ledgerbus.projections import fork

        task_id = await self.resolve(task_id)
        usage = await self.query("usage", "list", {"task_id": task_id, "tree": True, "limit": 10_000})
        js = self.nc.jetstream(timeout=10)
        made = await fork.plan(js, self.settings, task_id, at_seq, usage, live=live, match=match)
        await calls.store(js, made.manifest_body)
        # The fork's record first: whatever follows (the memory restored, the new root) is
        # done under it, and a fork cut short is still in the log as one.
        await self.send(made.forked, made.task_id)
        for event in made.memory:
            await self.send(event, event.agent)
        return made, await self.send_submission(made.root)

    async def llm_call(self, call: str) -> tuple[str, CallRecord]:
        """A recorded LLM call (its hash, or a unique prefix of at least 8 hex digits, as
        ``agentctl usage --calls`` shows it), checked against its hash."""
        from ledgerbus.agents.llm import calls

        if not calls.is_call_hash(call):
            rows = await self.query("usage", "list", {"call": call.lower(), "limit": 10}) if len(call) >= 8 else []
            found = sorted({r["call"] for r in rows})
            if len(found) != 1:
                raise NotFound(f"no recorded call {call!r}" if not found else
                               f"call prefix {call!r} is ambiguous: {', '.join(f[:16] for f in found)}")
            call = found[0]
        return call, await calls.fetch(self.nc.jetstream(timeout=10), call)

    # -- reading ---------------------------------------------------------------------------

    async def query(self, projection: str, op: str, request: Mapping[str, Any] | None = None) -> Any:
        """One query of the projector (``q.<projection>.<op>``, docs/projections.md)."""
        if self._reader is not None:
            from ledgerbus.projections import service

            reply = await service.answer(self._reader, subjects.query(projection, op), codec.encode(dict(request or {})))
            return query.unwrap(reply)
        return await query.ask(self.nc, projection, op, dict(request or {}))

    async def resolve(self, task_id: str) -> str:
        """The whole id of a task given its id or a unique prefix (at least
        :data:`MIN_PREFIX` characters) of one; an id nobody knows is returned as it is, and
        so is every id when no projector answers (a prefix needs the projection)."""
        subjects.token(task_id, "task id")
        if len(task_id) < MIN_PREFIX:
            return task_id
        try:
            matches: list[str] = await self.query("tasks", "resolve", {"prefix": task_id, "limit": 10})
        except QueryError:
            return task_id
        if task_id in matches or not matches:
            return task_id
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise NotFound(f"task id prefix {task_id!r} is ambiguous: {shown}")
        return matches[0]

    async def get(self, task_id: str, *, tree: bool = True, history: bool = False) -> Row:
        """One task (a unique id prefix will do) with its subtasks (``children``, nested,
        with ``tree``) and, with ``history``, its audit records. A submission the router
        rejected has no task row: it comes from the log, with ``status`` ``rejected``.
        Raises :class:`~ledgerbus.bus.errors.NotFound` for an id nobody knows."""
        task_id = await self.resolve(task_id)
        try:
            task: Row = await self.query("tasks", "get", {"task_id": task_id, "tree": tree})
        except NotFound as missing:
            if self._nc is None:
                raise
            found = [r async for r in self.events(task_id)]
            if not found:
                if str(missing) != f"no task {task_id}":  # the projection says more (its archive's cut)
                    raise
                raise NotFound(f"no task {task_id}: neither the projection nor the audit log knows it") from None
            submitted = [r for r in found if r.kind in ("task_submitted", "plan_submitted")]
            applied = missing.position or 0
            if not submitted or any(r.accepted and r.seq <= applied for r in submitted):
                # Only refusals of messages about it (a task an archive compacted out, or one
                # that never was), or a submission the projection applied and no longer
                # holds (compacted out: AUDIT is purged after the archive): none to show.
                raise
            task = _rejected_task(task_id, found)
            if history:
                task["history"] = [codec.to_builtins(r) for r in found]
            return task
        if history and self._nc is not None:
            task["history"] = [codec.to_builtins(r) async for r in self.events(task_id)]
        return task

    async def list(
        self, *, status: str | None = None, skill: str | None = None, agent: str | None = None,
        submitted_by: str | None = None, parent: str | None = None, limit: int = 50, before: int | None = None,
        top_level: bool = False,
    ) -> Page:
        """Tasks, newest first, filtered (``top_level``: only those with no parent);
        ``before`` is the cursor of the page before (:attr:`Page.next`)."""
        rows: Rows = await self.query("tasks", "list", {
            "status": status, "skill": skill, "agent": agent, "submitted_by": submitted_by, "parent_task_id": parent,
            "limit": limit, "before_seq": before, **({"top_level": True} if top_level else {})})
        return Page(rows, rows[-1]["submitted_seq"] if len(rows) == limit and rows else None)

    async def events(self, task_id: str | None = None, *, from_seq: int = 1,
                     follow: bool = False) -> AsyncIterator[AuditRecord]:
        """Audit records (of one task, or all) from ``from_seq``; with ``follow`` it waits
        for new ones instead of stopping at the end of the log."""
        async for record, _ in self.stored(task_id, from_seq=from_seq, follow=follow):
            yield record

    async def stored(self, task_id: str | None = None, *, from_seq: int = 1,
                     follow: bool = False) -> AsyncIterator[tuple[AuditRecord, bytes]]:
        """:meth:`events`, each with the bytes stored in the log (exactly what was hashed)."""
        filt = subjects.audit_for_key(task_id) if task_id else subjects.AUDIT_ALL
        async with contextlib.aclosing(records(self.nc.jetstream(timeout=10), filt, from_seq=from_seq,
                                               follow=follow)) as found:
            async for record, data in found:
                yield record, data

    async def agents(self) -> Rows:
        """Every agent that ever joined, with its status, skills and counts, and for live
        ones their replicas, load and last heartbeat."""
        rows: Rows = await self.query("agents", "list")
        if self._nc is None:
            return rows
        beats = await self.heartbeats()
        for row in rows:
            live = [b for b in beats if b["agent"] == row["name"]]
            row["replicas"] = len(live)
            row["load"] = sum(b["load"] for b in live)
            row["last_heartbeat"] = max((b["at"] for b in live), default=None)
        return rows

    async def heartbeats(self) -> Rows:
        """Every live agent instance's heartbeat (the ``agents`` bucket)."""
        import json

        import nats.js.errors

        js = self.nc.jetstream(timeout=10)
        try:
            kv = await js.key_value(subjects.AGENTS_BUCKET)
            keys = await kv.keys()
        except (nats.js.errors.NoKeysError, nats.js.errors.NotFoundError):
            return []
        beats = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                beats.append(json.loads(entry.value))
        return beats

    async def approvals(self, *, pending_only: bool = True) -> Rows:
        """Tasks held for approval, oldest first (decided ones too, without ``pending_only``)."""
        rows: Rows = await self.query("approvals", "list", {"status": "pending" if pending_only else None})
        return rows

    async def memory(self, agent: str) -> Row:
        """An agent's memory: role, knowledge, observations, reasoning, current task."""
        row: Row = await self.query("memory", "get", {"agent": agent})
        return row

    async def checkpoints(self, agent: str) -> Rows:
        """An agent's memory checkpoints, newest first."""
        rows: Rows = await self.query("checkpoints", "list", {"agent": agent})
        return rows

    async def shared(self, namespace: str, key: str | None = None) -> Any:
        """The live keys of a shared-context namespace (a list of rows), or one key's row."""
        if key is not None:
            return await self.query("shared", "get", {"namespace": namespace, "key": key})
        return await self.query("shared", "list", {"namespace": namespace})


class _LateHandle(TaskHandle):
    """A handle on a task this client did not submit: follows its first submission (or
    the one named), learning its kind from the log."""

    def __init__(self, bus: Bus, task_id: str, submission_id: str | None) -> None:
        placeholder = ev.TaskSubmitted(id=submission_id or "", task_id=task_id, skill="unknown")
        super().__init__(bus, placeholder, 0)

    async def watch(self, view: TaskView | PlanView | None = None) -> AsyncIterator[TaskView | PlanView]:
        js = self._bus.nc.jetstream(timeout=10)
        async with contextlib.aclosing(records(js, subjects.audit_for_key(self.task_id), follow=True)) as found:
            async for record, _ in found:
                event = record.event
                if isinstance(event, (ev.TaskSubmitted, ev.PlanSubmitted)) and (
                        not self.submission.id or record.msg_id == self.submission.id):
                    self.submission = event
                    break
        async for followed in TaskHandle.watch(self, view):
            yield followed


def _rejected_task(task_id: str, found: list[AuditRecord]) -> Row:
    """A task row for a submission the router refused (it never became a task)."""
    first = found[0]
    event = first.event
    skill = event.skill if isinstance(event, ev.TaskSubmitted) else ev.PLAN_SKILL if isinstance(
        event, ev.PlanSubmitted) else ""
    rejected = next((r for r in found if not r.accepted and r.kind in ("task_submitted", "plan_submitted")), None)
    return {"task_id": task_id, "kind": "plan" if first.kind == "plan_submitted" else "task", "skill": skill,
            "status": Status.REJECTED.value if rejected else Status.SUBMITTED.value,
            "code": rejected.code if rejected else "", "reason": rejected.reason if rejected else "",
            "error": f"rejected ({rejected.code}): {rejected.reason}" if rejected else "",
            "submitted_by": first.principal, "submitted_at": first.at.isoformat(), "submitted_seq": first.seq,
            "input": getattr(event, "input", {}), "children": [], "subtasks": []}


# -- connecting --------------------------------------------------------------------------


@asynccontextmanager
async def connect(
    url: str | None = None, *, name: str | None = None, user: str | None = None, password: str | None = None,
    settings: Settings | None = None, db: Path | None = None, span_name: str = "ledgerbus.submit",
    client_name: str | None = None,
) -> AsyncIterator[Bus]:
    """Connect to the bus as CLI principal ``cli-<name>`` (default: ``LEDGERBUS_CLI_NAME``
    or the login name) and yield a :class:`Bus`; the connection drains on the way out.

    Settings come from the environment (``LEDGERBUS_*``) and the project (found from the
    current directory as git finds a repository, or ``LEDGERBUS_HOME``), whose
    ``var/auth`` holds the credentials; ``url``, ``user`` and ``password`` override them.
    With ``db``, no connection: queries read that projection file (nothing can be sent).
    """
    settings = (settings or Settings.from_env()).replace(url=url, user=user, password=password)
    if name is None and settings.user and settings.user.startswith("cli-"):
        name = settings.user.removeprefix("cli-")
    who = subjects.principal("cli", name or cli_name())
    if db is not None:
        from ledgerbus.projections import db as dbmod
        from ledgerbus.projections import service

        conn = await dbmod.open_reader(db)
        try:
            yield Bus(None, settings, who, reader=service.Reader(conn), span_name=span_name)
        finally:
            await conn.close()
        return
    async with connected(settings, who.token, client_name=client_name or f"ledgerbus-{who.name}") as nc:
        yield Bus(nc, settings, who, span_name=span_name)
