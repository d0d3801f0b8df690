"""The router process: fetch, check, audit, act, ack - in that order, always."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ledgerbus.agents import discovery
from ledgerbus.bus import failpoints, metrics, pull, signing, subjects, tracing
from ledgerbus.bus.acks import LaterAcks
from ledgerbus.bus.cancel import stop_task
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.events import AgentLeft, TaskDispatched, kind_of, new_id
from ledgerbus.bus.jsmeta import ack_meta
from ledgerbus.bus.lifecycle import APPROVAL_REQUESTED, AWAITING_MATCH, BUDGET_EXCEEDED, NO_AGENT
from ledgerbus.bus.lifecycle import Status as TaskStatus
from ledgerbus.bus.provision import deadletter_consumer_config, provision, router_consumer_config
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.router import audit as audit_mod
from ledgerbus.router import deadletters, notices
from ledgerbus.router.audit import AuditLog
from ledgerbus.router.checkpoints import Checkpoints
from ledgerbus.router.checks import Check, Inbound, default_checks, run_checks
from ledgerbus.router.claims import AgentSkills, ClaimTokens
from ledgerbus.router.dispatch import deliver, dispatch, work_item, work_subject
from ledgerbus.router.errors import AuditAppendError
from ledgerbus.router.gauges import Gauges
from ledgerbus.router.lease import Lease
from ledgerbus.router.live import LiveAgents, start_watch
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.records import Decision, record_attributes, record_for
from ledgerbus.router.retention import Archiver
from ledgerbus.router.scheduler import RouterDecision, Scheduler
from ledgerbus.router.snapshots import Snapshots
from ledgerbus.router.state import RouterState

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("ledgerbus.router")


class Router:
    """Wires the pipeline to the bus. ``checks`` may be replaced (tests, policy plugins)."""

    def __init__(self, nc: Client, settings: Settings, checks: Sequence[Check] | None = None,
                 lease: Lease | None = None, accept_new_chain: bool = False) -> None:
        self.nc = nc
        self.lease = lease
        """With a lease, this router serves only while it is the leader (``agentctl router``)."""
        self.accept_new_chain = accept_new_chain
        """At the first start only: a stream that no longer holds the anchored checkpoint is
        accepted as a new chain (the break recorded in it) instead of refused."""
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.settings = settings
        self.policy = PolicyFile(settings.policy_path, settings.policy_check_interval_s)
        self.tokens = ClaimTokens()
        """Claim tokens, from the router's key once :meth:`start` has loaded it."""
        self.agent_skills = AgentSkills(settings.auth_dir, settings.policy_check_interval_s)
        catalog = discovery.catalog()
        self.installed = {name: info.capabilities for name, info in catalog.items()}
        types = {name: info.input_type for name, info in catalog.items() if info.input_type is not None}
        self.live = LiveAgents(settings.agents_ttl_s)
        self.checks = (
            list(checks) if checks is not None
            else default_checks(settings.max_message_bytes, self.policy, settings.max_checkpoint_bytes,
                                installed=self.installed.keys, input_types=lambda: types,
                                tokens=self.tokens, agent_skills=self.agent_skills.of,
                                live_skills=self.live.skills, agents_ttl_s=settings.agents_ttl_s)
        )
        self.state = RouterState(dedup_horizon_s=settings.dedup_horizon_s, dedup_max_ids=settings.dedup_max_ids)
        self.scheduler = Scheduler(self.live, self.installed, settings.max_message_bytes, self._may_run)
        self.publisher = Publisher(nc)
        self.audit = AuditLog(self.publisher, audit_mod.ChainHead())
        self.later_acks = LaterAcks()
        self._sub: pull.Puller | None = None
        self._watch: asyncio.Task[None] | None = None
        self._dead: asyncio.Task[None] | None = None
        self._dead_msgs: list[Msg] = []
        """MaxDeliver advisories fetched, for the serving loop to act on (it alone appends)."""
        self._undelivered: set[str] = set()
        """Tasks the scheduler dispatched whose work item is not known to be in WORK."""
        self.gauges = Gauges(self.js, not tracing.sdk_disabled())

    def _may_run(self, principal: str, skill: str) -> bool:
        """Whether the scheduler may pick ``skill`` for a step ``principal`` submitted by
        capabilities: the sender may submit it, and it needs no approval."""
        policy = self.policy.current()
        return policy.may_submit(principal, skill) and not policy.needs_approval(skill)

    async def start(self) -> None:
        """Provision the streams, rebuild state from the log, bind the INGRESS consumer."""
        key = signing.load_or_create(self.settings.router_key_path)
        self.tokens.use_key(key)
        self.checkpoints = Checkpoints(self.js, self.settings, key, asyncio.get_running_loop().time())
        self.snapshots = Snapshots(self.js, self.settings, key)
        self.archiver = Archiver(self.js, self.settings, key, self.policy)
        await provision(self.js, self.settings)
        await self.publisher.start()
        await self.checkpoints.anchors.load()
        try:
            await self._recover()
        finally:
            # Accepting a new chain is for this start only: a log lost later is refused again.
            self.accept_new_chain = False
        await self.checkpoints.anchor_head(self.state)
        self._watch = await start_watch(self.js, self.live, self.settings.connect_timeout_s)
        dead_sub = await self.js.pull_subscribe(
            subjects.DEADLETTER_ALL, durable=subjects.DEADLETTER_CONSUMER, stream=subjects.DEADLETTER_STREAM,
            config=deadletter_consumer_config(),
        )
        self._dead = asyncio.create_task(deadletters.fetch(dead_sub, self._dead_msgs))
        self._sub = await pull.durable(self.nc, self.js, subjects.INGRESS_STREAM,
                                       router_consumer_config(self.settings))
        log.info("router_started", head_seq=self.audit.head.seq)

    async def _recover(self) -> None:
        started = asyncio.get_running_loop().time()
        watch = self.checkpoints.anchors.watch()
        # The newest valid snapshot and the records after it, or (none) the whole log.
        loaded = await self.snapshots.load(watch)
        self.state, start = loaded or (RouterState(dedup_horizon_s=self.settings.dedup_horizon_s,
                                                          dedup_max_ids=self.settings.dedup_max_ids), ChainHead())
        head = await audit_mod.recover(self.js, self.state, watch, start,
                                       self.archiver.archive(self.policy.current().retention))
        log.info("audit_recovered", head_seq=head.seq, tasks=len(self.state.tasks),
                 from_snapshot=start.seq if loaded else None, tail=head.seq - start.seq,
                 seconds=round(asyncio.get_running_loop().time() - started, 3))
        self.checkpoints.stream_created = (await self.js.stream_info(subjects.AUDIT_STREAM)).created
        self.audit = AuditLog(self.publisher, head)
        await self.checkpoints.check_anchors(head, watch, self.audit, self.state, self.accept_new_chain)
        ingress = await self.js.stream_info(subjects.INGRESS_STREAM)
        self.state.seen.forget_acked_before(ingress.state.first_seq)
        # Whatever was decided before a crash but not acted on is decided again from here;
        # whatever was dispatched may not have reached WORK (a re-publish is de-duplicated).
        self.state.dirty.update(self.state.open_tasks())
        self.live.changed = True  # work assigned to agents no longer live is handed on
        self._undelivered = {
            task_id for task_id, task in self.state.tasks.items() if task.routed and task.status is TaskStatus.PENDING
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; the batch in hand is always finished first.

        With a :class:`Lease`, wait as a standby until this process holds it, serve while
        it does, and go back to waiting if it is lost (a pause, a partition): the log is
        read again on every takeover, so nothing a former leader wrote is missed.
        """
        while not stop.is_set():
            if self.lease is not None and not await self.lease.acquire(stop):
                break
            lost = asyncio.Event()
            keeper = asyncio.create_task(self.lease.keep(lost)) if self.lease is not None else None
            try:
                if self._sub is None:
                    await self.start()
                await self._serve(stop, lost)
            finally:
                if keeper is not None:
                    await stop_task(keeper)
                if stop.is_set():
                    # The last metrics export (at exit) reads the state as it is now.
                    await self.gauges.refresh(self.state, force=True)
                await self._unbind()
            if self.lease is None:
                break
            if not stop.is_set():
                self.lease.drop()
                log.warning("stepped_down", instance=self.lease.instance, head_seq=self.audit.head.seq)
        if self.lease is not None:
            await self.lease.release()
        log.info("router_stopped", head_seq=self.audit.head.seq)

    @property
    def _holds_lease(self) -> bool:  # or has none: one router alone
        return self.lease is None or self.lease.held

    def _leading(self, stop: asyncio.Event, lost: asyncio.Event) -> bool:
        return not stop.is_set() and not lost.is_set() and self._holds_lease

    async def _serve(self, stop: asyncio.Event, lost: asyncio.Event) -> None:
        assert self._sub is not None
        # A stop or a lost lease ends a fetch waiting for INGRESS at once, not after it.
        waker = asyncio.create_task(self._sub.interrupt_on(stop, lost))
        try:
            await self._serve_batches(stop, lost)
        finally:
            waker.cancel()

    async def _serve_batches(self, stop: asyncio.Event, lost: asyncio.Event) -> None:
        assert self._sub is not None
        while self._leading(stop, lost):
            try:
                # Not nats-py's fetch, which can hold a lone message for the whole wait
                # (bus/pull.py says when).
                msgs = await self._sub.pull(self.settings.router_batch, self._idle_wait())
            except nats.errors.Error as exc:
                log.warning("ingress_fetch_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            if not self._leading(stop, lost) and not stop.is_set():
                # The lease went while this fetch waited: the next leader takes them now.
                for msg in msgs:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.nak()
                return
            try:
                if msgs:
                    failpoints.reached("router.fetched")
                    await self.process(msgs)
                if lost.is_set() or not self._holds_lease:
                    continue  # lost while the batch was appended: no new decision of this router's
                await self.schedule()
                await self._dead_letters()
                if not await self.checkpoints.append_if_due(self.audit, self.state):
                    await self._recover()
                # A batch boundary: every record folded into the state is acknowledged.
                self.snapshots.maybe_save(self.state, self.audit.head)
                await self.archiver.step(self.audit, self.state, self.snapshots.saved_seq if self.snapshots.enabled
                                         else None, lambda record, data: self.audit.append([(record, data, {})]))
                await self.gauges.refresh(self.state)
            except (nats.errors.Error, AuditAppendError) as exc:
                # The log is consistent whatever failed here (records are appended before
                # anything is acted on); unacked messages come back and are settled then.
                log.error("batch_failed", error=str(exc))
                await self._recover_until_done(stop)

    async def _unbind(self) -> None:
        """Let go of INGRESS and stop the watchers (before the connection drains, or the
        drain waits out a pull request); a snapshot or an anchor being written is finished."""
        if (snapshots := getattr(self, "snapshots", None)) is not None:
            await snapshots.stop()
            await self.archiver.stop()
            await self.checkpoints.settled()
        await self.later_acks.flush()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.close()
            self._sub = None
        if self._dead is not None:
            await stop_task(self._dead)
            self._dead = None
        if self._watch is not None:
            await stop_task(self._watch)
            self._watch = None

    def _idle_wait(self) -> float:
        """How long a fetch may wait for INGRESS: until the next retry is due, at most 1 s."""
        next_due = self.state.due(datetime.now(UTC))
        if next_due is None:
            return 1.0
        return min(1.0, max(0.05, (next_due - datetime.now(UTC)).total_seconds()))

    async def schedule(self) -> None:
        """Append the scheduler's decisions and act on them, until nothing more follows.

        Like every record, a decision is in the log before anything acts on it. Raises
        :class:`AuditAppendError` when the log did not take them (the caller recovers).
        """
        self.live.expire(datetime.now(UTC))
        await self._record_lapsed()
        for _ in range(1000):
            events = self.scheduler.decide(self.state, datetime.now(UTC))
            if not events:
                break
            pending = [self._router_record(event) for event in events]
            for record, _, headers in pending:
                self.state.apply(record, headers.get(subjects.HDR_TRACEPARENT, ""))
            await self.audit.append(pending)
            for record, _, _ in pending:
                if isinstance(record.event, TaskDispatched):
                    self._undelivered.add(record.event.task_id)
                log.info("scheduled", seq=record.seq, kind=record.kind, task_id=record.key)
            await notices.cancels(self.nc, self.state, [record for record, _, _ in pending])
        else:
            log.error("scheduler_did_not_settle", dirty=len(self.state.dirty))
        await self._deliver()

    async def _record_lapsed(self) -> None:
        """Record ``agent_left`` (``heartbeat_expired``) for each instance whose heartbeat
        lapsed: it stopped without draining (killed, crashed, cut off). An agent that
        drains records its own ``agent_left``, so a deleted key is not recorded here."""
        lapsed, self.live.lapsed = self.live.lapsed, []
        if not lapsed:
            return
        pending = [self._router_record(AgentLeft(
            id=new_id(), instance=beat.instance, agent=beat.agent, reason="heartbeat_expired",
            remaining=remaining)) for beat, remaining in lapsed]
        for record, _, _ in pending:
            self.state.apply(record)
        await self.audit.append(pending)
        for record, _, _ in pending:
            log.warning("agent_lapsed", seq=record.seq, agent=record.key, instance=record.event.instance,  # type: ignore[union-attr]
                        remaining=record.event.remaining)  # type: ignore[union-attr]

    async def _dead_letters(self) -> None:
        """Dead-letter the tasks whose WORK message reached MaxDeliver with no result
        (:func:`router.deadletters.settle`), then schedule what that freed."""
        msgs = self._dead_msgs[:]
        del self._dead_msgs[:]  # the same list the fetcher fills
        if msgs:
            await deadletters.settle(msgs, self.js, self.state, self._router_record, self.audit.append)
            await self.schedule()

    def _router_record(self, event: RouterDecision | AgentLeft) -> tuple[AuditRecord, bytes, dict[str, str]]:
        """Seal the record of one of the router's own decisions; with its headers. A task
        that has a trace gets the decision as a ``router.decide`` span in it, a child of
        the record that caused it (:meth:`RouterState.cause`). An ``agent_left`` is about
        the agent (its key), and has no cause to trace under."""
        task_id = event.agent if isinstance(event, AgentLeft) else event.task_id
        kind = kind_of(type(event))
        cause = "" if isinstance(event, AgentLeft) else self.state.cause(task_id)
        span = (tracer.start_span(f"router.decide {kind}", context=tracing.context_of(cause))
                if cause else trace.INVALID_SPAN)
        record, data = self.audit.seal(AuditRecord(
            seq=0, at=datetime.now(UTC), verdict="accepted", code="ok", reason="", principal="router",
            kind=kind, key=task_id, msg_id=event.id, ingress_seq=0, delivery=0, event=event,
            trace_id=tracing.trace_id_of_span(span),
        ))
        span.set_attributes(record_attributes(record))
        # An unsampled span still propagates (flagged unsampled), so the agent does not start
        # a trace of its own; with no cause there is no context and no header.
        headers = tracing.headers_of(span)
        span.end()
        return record, data, headers

    async def _deliver(self) -> None:
        """Publish the work items of the scheduler's dispatches not yet known to be stored."""
        self._undelivered = await deliver(self.publisher, self.state, self.tokens, self._undelivered)

    async def _recover_until_done(self, stop: asyncio.Event) -> None:
        """Rebuild state and chain head from the log, retrying while the server is away."""
        delay = 0.2
        while not stop.is_set():
            try:
                await self._recover()
                return
            except (nats.errors.Error, AuditAppendError) as exc:
                log.warning("recover_retry", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def process(self, msgs: list[Msg]) -> None:
        """Audit a batch, act on it, ack it. On an audit failure, rebuild and retry later."""
        try:
            decisions = await self.audit_batch(msgs)
        except AuditAppendError as exc:
            # Some records of the batch may be stored: rebuild from the log, and let the
            # whole batch come back (what was stored is then only re-dispatched).
            log.error("audit_append_failed", error=str(exc))
            for msg in msgs:
                await msg.nak(delay=1)
            if self._holds_lease:
                await self._recover()  # a router that lost its lease meanwhile reads the log at its next takeover
            return
        failpoints.reached("router.appended")
        await self.act(decisions)

    async def audit_batch(self, msgs: list[Msg]) -> list[Decision]:
        """Check every message and append one audit record for each not audited before.

        Each message is processed in a ``router.process`` span, a child of the trace its
        headers carry; the span ends once the message is settled (:meth:`act`).
        """
        decisions: list[Decision] = []
        pending: list[tuple[AuditRecord, bytes, dict[str, str]]] = []
        # Added to the tally once per batch and key, not per message.
        counted: Counter[tuple[str, str, str]] = Counter()
        for msg in msgs:
            meta = ack_meta(msg)
            headers = dict(msg.headers or {})
            span = tracing.start_span(tracer, "router.process", headers)
            # Attributes only for a span that records (the sampler does not read them): most
            # messages are not sampled, and building them costs some microseconds each.
            recording = span.is_recording()
            if recording:
                span.set_attributes({
                    **tracing.messaging(msg.subject, "process", headers.get(subjects.HDR_MSG_ID, ""),
                                        from_client=True),
                    "messaging.consumer.group.name": subjects.ROUTER_CONSUMER,
                    "ledgerbus.ingress_seq": meta.stream_seq,
                    "ledgerbus.delivery": meta.delivered})
            if (seen := self.state.seen.record(meta.stream_seq)) is not None:
                # Audited before a crash, not acked: act again (idempotently), audit never twice.
                log.info("ingress_redelivered_already_audited", ingress_seq=meta.stream_seq, seq=seen.seq)
                if recording:
                    span.set_attributes({"ledgerbus.redelivered": True, **record_attributes(seen)})
                decisions.append(Decision(msg, seen, tracing.headers_of(span), span))
                continue
            inbound = Inbound(
                subject=msg.subject,
                data=msg.data,
                headers=headers,
                ingress_seq=meta.stream_seq,
                delivery=meta.delivered,
                received_at=meta.stored_s,
            )
            inbound, rejection = run_checks(self.checks, inbound, self.state, self.settings.trace_checks == "all",
                                            span)
            if rejection is not None:
                code, reason = rejection.code, rejection.reason
            elif inbound.held:
                code, reason = APPROVAL_REQUESTED, "the skill is marked dangerous: waiting for an approver"
                if inbound.unserved:
                    reason = f"{reason}; {inbound.unserved}"
            elif inbound.over_budget:
                code, reason = BUDGET_EXCEEDED, inbound.over_budget
            elif inbound.unserved:
                code, reason = AWAITING_MATCH if inbound.await_match else NO_AGENT, inbound.unserved
            else:
                code, reason = "ok", ""
            record, data = self.audit.seal(record_for(inbound, code, reason, tracing.trace_id_of_span(span),
                                                         accepted=rejection is None))
            if recording:
                span.set_attributes(record_attributes(record))
            counted[record.kind, record.verdict, code] += 1
            if rejection is not None:
                span.set_status(Status(StatusCode.ERROR, f"rejected: {code}: {record.reason}"))
            out_headers = tracing.headers_of(span)
            # Later messages of the same batch must see this one (e.g. a duplicate task id).
            self.state.apply(record, out_headers.get(subjects.HDR_TRACEPARENT, ""))
            pending.append((record, data, out_headers))
            decisions.append(Decision(msg, record, out_headers, span))
            if rejection is not None:
                with trace.use_span(span, end_on_exit=False):
                    log.info("rejected", seq=record.seq, code=code, reason=record.reason, principal=record.principal)
        if pending:
            try:
                await self.audit.append(pending)
            except AuditAppendError as exc:
                for d in decisions:
                    d.end(error=str(exc))
                raise
        for (kind, verdict, code), n in counted.items():
            metrics.router_messages.add(n, {"kind": kind, "verdict": verdict, "code": code})
        return decisions

    async def act(self, decisions: list[Decision]) -> None:
        """Dispatch what the records ask for, then ack INGRESS for every settled message."""
        work = [(d, item) for d in decisions if (item := work_item(d.record, self.state, self.tokens)) is not None]
        results = await dispatch(self.publisher, [(item, d.headers) for d, item in work])
        failed = {id(d) for (d, _), err in zip(work, results, strict=True) if err is not None}
        for (d, item), err in zip(work, results, strict=True):
            if d.span.is_recording():
                d.span.set_attribute("ledgerbus.work.subject", work_subject(item))
            if err is not None:
                log.warning("dispatch_failed", task_id=item.task_id, skill=item.skill, error=str(err))
        records = [d.record for d in decisions]
        await notices.claims(self.nc, records)
        await notices.cancels(self.nc, self.state, records)
        failpoints.reached("router.dispatched")
        alone = len(decisions) == 1
        for d in decisions:
            if id(d) in failed:
                await d.msg.nak(delay=1)
                d.end(error="dispatch failed: the message will be processed again")
            else:
                if alone:
                    self.later_acks.add(d.msg)  # off the task's path (bus/acks.py)
                else:
                    await d.msg.ack()
                d.end()
