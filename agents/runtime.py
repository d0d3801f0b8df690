"""The agent runtime: join, heartbeat, pull work for each skill, run it, report, drain.

Per task: report ``TaskStarted`` (the claim: the dispatch it answers, the token its work
item carried, which proves the delivery, and the attempt, the dispatch's earlier claims
plus the JetStream delivery count) and wait for the
router's verdict on it (``notify.agent.<name>.claim``): a refused claim (the task was
cancelled, finished, or claimed by a newer delivery) is dropped without running. Then
run the skill under the task's deadline while telling JetStream the work is in progress,
report ``TaskCompleted``/``TaskFailed``, and ack WORK only after that report's PubAck.
An agent killed at any point leaves its message unacked, so WORK redelivers it to
another replica after AckWait. A cancel notice stops the running skill.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ledgerbus.agents import workspace
from ledgerbus.agents.attempt import skill_context
from ledgerbus.agents.claim import AttemptClaim
from ledgerbus.agents.errors import SkillError
from ledgerbus.agents.hooks import Hooks
from ledgerbus.agents.intake import Intake, KeepAlive, nothing_behind
from ledgerbus.agents.llm import calls
from ledgerbus.agents.llm.replay import Recording
from ledgerbus.agents.skill import Skill, SkillContext, decode_input, encode_output
from ledgerbus.bus import codec, failpoints, metrics, pull, subjects, tracing
from ledgerbus.bus.acks import LaterAcks
from ledgerbus.bus.cancel import stop_task
from ledgerbus.bus.connection import PUBACK_TIMEOUT_S
from ledgerbus.bus.errors import BusError, SchemaError
from ledgerbus.bus.events import AgentJoined, AgentLeft, Event, TaskCompleted, TaskFailed, TaskStarted, kind_of, new_id
from ledgerbus.bus.jsmeta import ack_meta
from ledgerbus.bus.logs import bound_contextvars
from ledgerbus.bus.messages import Heartbeat, Notice, WorkItem
from ledgerbus.bus.provision import assigned_consumer_config, wait_for_stream, work_consumer_config
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.settings import Settings

if TYPE_CHECKING:
    from ledgerbus.agents.llm.router import LLMRouter

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("ledgerbus.agent")

_REPORT_TRIES = 5


ASSIGNED = ""
"""The intake's name for the work assigned to this agent (any of its skills)."""
RECORDINGS_KEPT = 8
"""How many recordings (of forks under way) an agent keeps loaded."""


class Agent:
    """One agent process: ``name`` is its identity, ``skills`` what it can run."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        name: str,
        skills: dict[str, Skill],
        concurrency: int = 1,
        capabilities: list[str] | None = None,
        profile: str = "",
        hooks: Hooks | None = None,
        llm: LLMRouter | None = None,
        instructions: str = "",
    ) -> None:
        if not skills:
            raise ValueError("an agent needs at least one skill")
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.settings = settings
        self.principal = subjects.principal("agent", name)
        self.name = name
        suffix = secrets.token_hex(4)
        self.instance = f"{name}-{suffix}"
        # The heartbeat key is <name>.<suffix>, so an agent's permissions can cover its own
        # keys ($KV.agents.<name>.>) and no other agent's.
        self.kv_key = subjects.heartbeat_key(name, suffix)
        self.skills = skills
        self.concurrency = concurrency
        extra = list(capabilities or ())
        self.capabilities = {
            name: sorted({*(getattr(skill, "capabilities", ()) or ()), *extra}) for name, skill in skills.items()
        }
        """skill → what it can do: the skill's own capabilities and the agent's (profile)"""
        self.profile = profile
        self.instructions = instructions
        """the profile's instructions, handed to skills as ``ctx.instructions``"""
        self.hooks = hooks or Hooks()
        self.llm = llm
        self._recordings: dict[str, asyncio.Future[Recording]] = {}
        """Recordings that forked tasks replay (by hash), loaded once each (the newest few kept)."""
        self._claims: dict[str, asyncio.Future[Notice]] = {}
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._loads: dict[str, int] = {}
        self.log = log.bind(agent=name, instance=self.instance)
        self.intake = Intake(concurrency, len(skills) + 1, self._handle, self._keep_alive, self.log)
        self.later_acks = LaterAcks()
        self._publisher = Publisher(nc)
        """Reports go out through one reply subscription (``bus/publish.py``), not a
        request (an inbox, a timer and a future) per report as ``js.publish`` makes."""

    async def _store_call(self, body: bytes) -> str:
        """Store a recorded LLM call in LLMCALLS; its hash (``TaskUsage.call``)."""
        return await calls.store(self.js, body)

    async def _recording(self, name: str) -> Recording:
        """The recording ``name`` (a fork's), read from LLMCALLS once and shared by its tasks."""
        loading = self._recordings.get(name)
        if loading is None or (loading.done() and loading.exception() is not None):
            loading = self._recordings[name] = asyncio.ensure_future(Recording.from_store(self.js, name))
            while len(self._recordings) > RECORDINGS_KEPT:
                self._recordings.pop(next(iter(self._recordings)))
        return await asyncio.shield(loading)

    @property
    def load(self) -> int:
        """How many tasks this instance is running now."""
        return len(self.intake.running)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain: finish (or hand back) what is in hand."""
        # The router provisions the streams, then the buckets: an agent started first waits for
        # both (honcho starts every process at once), rather than exit on a missing bucket.
        for stream in (subjects.WORK_STREAM, subjects.kv_stream(subjects.AGENTS_BUCKET)):
            await wait_for_stream(self.js, stream, self.settings.connect_timeout_s)
        subs = {skill: await pull.durable(self.nc, self.js, subjects.WORK_STREAM, work_consumer_config(self.settings, skill))
                for skill in self.skills}
        # Work the router assigned to this agent (a step matched to it, in priority order).
        subs[ASSIGNED] = await pull.durable(self.nc, self.js, subjects.WORK_STREAM,
                                            assigned_consumer_config(self.settings, self.name))
        kv = await self.js.key_value(subjects.AGENTS_BUCKET)
        notices = await self.nc.subscribe(subjects.notify_all(self.principal), cb=self._on_notice)
        await self.report(AgentJoined(
            id=new_id(), instance=self.instance, skills=sorted(self.skills), concurrency=self.concurrency,
            capabilities={s: c for s, c in self.capabilities.items() if c}, profile=self.profile,
        ))
        self.log.info("agent_joined", skills=sorted(self.skills), concurrency=self.concurrency)
        pullers = [asyncio.create_task(self.intake.pull(skill, sub)) for skill, sub in subs.items()]
        beat = asyncio.create_task(self._heartbeat(kv))
        await stop.wait()
        await self.intake.drain(pullers, self.settings.drain_timeout_s)
        await self.later_acks.flush()
        # Ended for sure before the key is deleted: a beat whose put swallowed the cancel
        # (nats-py's wait_for) would write the key again after the delete.
        await stop_task(beat)
        for sub in subs.values():
            await sub.close()
        await notices.unsubscribe()
        try:
            await kv.delete(self.kv_key)
        except nats.errors.Error as exc:
            self.log.warning("heartbeat_delete_failed", error=str(exc))
        await self.report(AgentLeft(id=new_id(), instance=self.instance, reason="drained"))
        self.log.info("agent_left")

    async def _on_notice(self, msg: Msg) -> None:
        """A claim verdict or a cancellation from the router."""
        try:
            notice = msgspec.json.decode(msg.data, type=Notice)
        except msgspec.DecodeError as exc:
            self.log.warning("notice_undecodable", subject=msg.subject, error=str(exc))
            return
        if msg.subject.endswith(".claim"):
            waiter = self._claims.get(notice.msg_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(notice)
        elif msg.subject.endswith(".cancel"):
            running = self._running.get(notice.task_id)
            if running is not None:
                self.log.info("task_cancel_requested", task_id=notice.task_id, reason=notice.reason)
                running.cancel()

    async def _heartbeat(self, kv: KeyValue) -> None:
        while True:
            beat = Heartbeat(
                agent=self.name,
                instance=self.instance,
                skills=sorted(self.skills),
                concurrency=self.concurrency,
                load=self.load,
                at=datetime.now(UTC),
                capabilities={s: c for s, c in self.capabilities.items() if c},
                loads={s: n for s, n in self._loads.items() if n},
            )
            try:
                await kv.put(self.kv_key, codec.encode(beat))
            except nats.errors.Error as exc:
                self.log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def report(self, event: Event, headers: dict[str, str] | None = None) -> None:
        """Send an event to the router through INGRESS and wait for its PubAck.

        Retries are safe: the message id is the JetStream de-duplication id.
        """
        data = codec.encode(event)
        subject = subjects.ingress(self.principal, kind_of(type(event)))
        hdrs = tracing.inject(headers)
        hdrs[subjects.HDR_MSG_ID] = event.id
        await self._publisher.start()
        delay = 0.2
        for attempt in range(1, _REPORT_TRIES + 1):
            (outcome,) = await self._publisher.publish([(subject, data, hdrs)], timeout=PUBACK_TIMEOUT_S)
            if isinstance(outcome, PubAck):
                return
            if not isinstance(outcome, TimeoutError | nats.js.errors.NoStreamResponseError
                              | nats.errors.ConnectionClosedError | nats.errors.ConnectionReconnectingError):
                raise BusError(f"{kind_of(type(event))} refused by INGRESS: {outcome}")
            if attempt == _REPORT_TRIES:
                raise BusError(f"{kind_of(type(event))} not acknowledged by INGRESS: {outcome}")
            await asyncio.sleep(delay)
            delay *= 2

    async def _handle(self, skill_name: str, msg: Msg) -> None:
        try:
            item = codec.decode_work(msg.data)
        except SchemaError as exc:
            # Only the router writes WORK, so this is a bug or a schema skew: never retry it.
            self.log.error("work_item_undecodable", error=str(exc))
            await msg.term()
            return
        if skill_name == ASSIGNED:
            skill_name = item.skill
            if skill_name not in self.skills:
                # Assigned while an earlier process of this name offered it: the router hands
                # it on once the heartbeat shows the skill is gone.
                self.log.error("assigned_skill_not_served", task_id=item.task_id, skill=skill_name)
                await msg.term()
                return
        attempt = item.attempt_base + ack_meta(msg).delivered
        msg_id = (msg.headers or {}).get(subjects.HDR_MSG_ID, "")
        with bound_contextvars(task_id=item.task_id, agent=self.name), \
                trace.use_span(tracing.start_span(tracer, "agent.run", msg.headers), end_on_exit=True) as span:
            if span.is_recording():  # most tasks are not sampled: no attributes to build
                span.set_attributes({
                    **tracing.messaging(msg.subject, "process", msg_id),
                    "messaging.consumer.group.name": (subjects.assigned_consumer(self.name) if item.agent
                                                      else subjects.work_consumer(skill_name)),
                    "ledgerbus.task_id": item.task_id,
                    "ledgerbus.skill": skill_name,
                    "ledgerbus.agent": self.name,
                    "ledgerbus.instance": self.instance,
                    "ledgerbus.attempt": attempt,
                })
            try:
                await self._run(skill_name, item, attempt, msg)
            except BusError as exc:
                # The report did not reach INGRESS: leave the message unacked for redelivery.
                self.log.error("report_failed", task_id=item.task_id, error=str(exc))
            except asyncio.CancelledError:
                # Drain ran out of time: hand the task back now rather than after AckWait.
                await msg.nak()
                raise

    async def _claim(self, item: WorkItem, attempt: int, msg: Msg, tlog: Any) -> bool:
        """Claim the task and wait for the router's verdict: whether to run it.

        A refused claim is settled for good (the message is terminated); no verdict
        within ``claim_timeout_s`` hands the message back for a later, newer claim.
        """
        claim = TaskStarted(id=new_id(), task_id=item.task_id, attempt=attempt, dispatch=item.dispatch,
                            token=item.token)
        waiter: asyncio.Future[Notice] = asyncio.get_running_loop().create_future()
        self._claims[claim.id] = waiter
        keepalive = self._keep_alive(msg)
        try:
            await self.report(claim)
            notice = await asyncio.wait_for(waiter, self.settings.claim_timeout_s)
        except TimeoutError:
            tlog.warning("claim_unanswered", timeout_s=self.settings.claim_timeout_s)
            await msg.nak()
            return False
        finally:
            keepalive.cancel()
            self._claims.pop(claim.id, None)
        if notice.verdict != "accepted":
            tlog.info("claim_refused", code=notice.code, reason=notice.reason)
            await msg.term()
            return False
        return True

    async def _run(self, skill_name: str, item: WorkItem, attempt: int, msg: Msg) -> None:
        tlog = self.log.bind(task_id=item.task_id, skill=skill_name, attempt=attempt)
        claim = AttemptClaim(self, item, attempt, msg, tlog)
        if getattr(self.skills[skill_name], "claim_first", True):
            if not await claim.send():
                return
        else:
            claim.send_after(self.settings.claim_after_s)
        loop = asyncio.get_running_loop()
        try:
            place = (await workspace.make(self.settings.workspace_root, self.name, item.task_id, attempt, item.context)
                     if workspace.wanted(self.skills[skill_name]) else None)
        except OSError as exc:
            # This agent's disk, not the task, is at fault; say so rather than crash the handler.
            tlog.error("workspace_failed", error=str(exc))
            failed = await claim.result(TaskFailed(
                id=new_id(), task_id=item.task_id, attempt=attempt,
                error=f"agent {self.name} cannot make the task's workspace: {exc}"[:16_384]))
            if failed is not None:
                await self.report(failed)
                await msg.ack()
            return
        ctx = skill_context(self, skill_name, item, attempt, claim, tlog, place, tracer)
        keepalive = self._keep_alive(msg)
        deadline = asyncio.timeout(item.timeout_s)
        result: TaskCompleted | TaskFailed | None = None
        outcome = "cancelled"
        started = loop.time()
        running = asyncio.create_task(self._execute(self.skills[skill_name], ctx, item.input))
        claim.on_refused = running.cancel  # a late claim refused: the skill's work does not count
        self._running[item.task_id] = running
        self._loads[skill_name] = self._loads.get(skill_name, 0) + 1
        try:
            async with deadline:
                output = await running
            result = self._completed(item.task_id, attempt, output)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                claim.abandon()
                raise  # the agent is draining: the caller hands the task back
            if claim.refused:
                return  # the refused (or unanswered) claim settled the message
            # The router cancelled the task: its result would not count. Settle the message.
            tlog.info("task_cancelled")
            await msg.term()
            return
        except TimeoutError as exc:
            error = f"deadline exceeded: the task's timeout is {item.timeout_s:g}s" if deadline.expired() else f"TimeoutError: {exc}"
            result = TaskFailed(id=new_id(), task_id=item.task_id, attempt=attempt, error=error)
        except SkillError as exc:
            result = TaskFailed(id=new_id(), task_id=item.task_id, attempt=attempt, error=str(exc)[:16_384])
        except Exception as exc:  # noqa: BLE001 - a plugin may raise anything; it becomes the task's error
            tlog.exception("skill_raised")
            result = TaskFailed(
                id=new_id(), task_id=item.task_id, attempt=attempt, error=f"{type(exc).__name__}: {exc}"[:16_384]
            )
        finally:
            ran = loop.time() - started
            if result is not None:
                outcome = "completed" if isinstance(result, TaskCompleted) else "failed"
            else:
                self._timed(skill_name, outcome, ran)
            span = trace.get_current_span()
            span.set_attribute("ledgerbus.outcome", outcome)
            if isinstance(result, TaskFailed):
                span.set_status(Status(StatusCode.ERROR, result.error[:512]))
            keepalive.cancel()
            self._running.pop(item.task_id, None)
            self._loads[skill_name] -= 1
            if not running.done():
                running.cancel()
            # Also when cancelled or drained: a handed-back task starts afresh elsewhere.
            if place is not None:
                workspace.release(place, failed=isinstance(result, TaskFailed), keep=self.settings.keep_workspaces)
        assert result is not None  # every way out of the try without one returns or raises
        try:
            failpoints.reached("agent.skill_done")
            settled = await claim.result(result)
            if settled is None:
                return  # the claim was refused, or never answered: the message is settled
            await self.report(settled)
            if nothing_behind(msg):
                self.later_acks.add(msg)  # off the task's path (bus/acks.py)
            else:
                await msg.ack()
        finally:
            # Once the report is out, not on the task's path: a histogram's record goes
            # through the SDK's aggregation, a lone task's largest metrics cost in the agent.
            self._timed(skill_name, outcome, ran)
        # One line per task outcome: a failure at info; a completion at debug, since at
        # hundreds of tasks a second the console would be nothing else (Celery's default
        # level, warning, shows neither). Every outcome is in the audit log.
        (tlog.info if isinstance(settled, TaskFailed) else tlog.debug)("task_finished", outcome=kind_of(type(result)))

    def _timed(self, skill_name: str, outcome: str, seconds: float) -> None:
        """Record one run of ``skill_name`` in the skill-duration histogram."""
        metrics.skill_duration.record(seconds, {"ledgerbus.skill": skill_name, "ledgerbus.agent": self.name,
                                                "ledgerbus.outcome": outcome})

    async def _execute(self, skill: Skill, ctx: SkillContext, raw: Any) -> Any:
        """Hooks before, the input checked against the skill's type, the skill, its output
        checked, hooks after: what the task's result is made of. In the ``agent.run`` span
        (one span per hop): the skill's own spans, an LLM call or a sandboxed process, are
        its children."""
        raw = await self.hooks.before(ctx, raw)
        output = encode_output(skill, await skill.run(ctx, decode_input(skill, raw)))
        return await self.hooks.after(ctx, raw, output)

    def _completed(self, task_id: str, attempt: int, output: Any) -> TaskCompleted | TaskFailed:
        """A completion, unless the output cannot travel: then a failure that says why."""
        event = TaskCompleted(id=new_id(), task_id=task_id, attempt=attempt, output=output)
        try:
            size = len(codec.encode(event))
        except (TypeError, msgspec.EncodeError) as exc:
            return TaskFailed(id=new_id(), task_id=task_id, attempt=attempt, error=f"output is not JSON: {exc}")
        except RecursionError:
            return TaskFailed(id=new_id(), task_id=task_id, attempt=attempt, error="output is nested too deeply")
        if size > self.settings.max_message_bytes:
            return TaskFailed(
                id=new_id(),
                task_id=task_id,
                attempt=attempt,
                error=f"output is {size} bytes; the limit is {self.settings.max_message_bytes}",
            )
        return event

    def _keep_alive(self, msg: Msg) -> KeepAlive:
        return KeepAlive(msg, self.settings.work_ack_wait_s, self.log)
