"""MaxDeliver advisories: JetStream's word that it gave up redelivering a WORK message.

A background task fetches them from DEADLETTERS into a list; the router's serving loop,
which alone appends to the log, dead-letters their tasks from there (:func:`settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.connection import cancel_requested
from ledgerbus.bus.errors import SchemaError
from ledgerbus.bus.events import TaskDeadLettered, new_id
from ledgerbus.bus.lifecycle import Status
from ledgerbus.bus.records import AuditRecord
from ledgerbus.router.state import RouterState

Sealed = tuple[AuditRecord, bytes, dict[str, str]]

log = structlog.get_logger(__name__)

BACKLOG = 64
"""Advisories held for the serving loop at most; the rest wait in DEADLETTERS."""


class MaxDeliverAdvisory(msgspec.Struct, frozen=True):
    """The fields of JetStream's ``io.nats.jetstream.advisory.v1.max_deliver`` we use."""

    stream_seq: int
    deliveries: int = 0


async def fetch(sub: JetStreamContext.PullSubscription, into: list[Msg]) -> None:
    """Fetch advisories into ``into`` until cancelled (then unsubscribe)."""
    try:
        while not cancel_requested():
            if len(into) >= BACKLOG:
                await asyncio.sleep(0.1)
                continue
            try:
                into += await sub.fetch(16, timeout=1.0)
            except TimeoutError:
                continue
            except nats.errors.Error as exc:
                log.warning("deadletter_fetch_failed", error=str(exc))
                await asyncio.sleep(1.0)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def settle(msgs: list[Msg], js: JetStreamContext, state: RouterState,
                 seal: Callable[[TaskDeadLettered], Sealed],
                 append: Callable[[list[Sealed]], Awaitable[None]]) -> None:
    """Dead-letter the tasks of these advisories whose WORK message reached MaxDeliver with
    no result: the task's claimants all died or hung.

    The task is dead-lettered in the log first (``seal`` makes the router's record,
    ``append`` stores it), then the message is removed from WORK (it would stay for ever),
    then the advisory is acked: a crash in between repeats only harmless steps.
    """
    for msg in msgs:
        try:
            advisory = msgspec.json.decode(msg.data, type=MaxDeliverAdvisory)
            stored = await js.get_msg(subjects.WORK_STREAM, advisory.stream_seq)
            item = codec.decode_work(stored.data or b"")
        except nats.js.errors.NotFoundError:
            await msg.ack()  # acked (or removed) since: nothing to dead-letter
            continue
        except (msgspec.DecodeError, SchemaError) as exc:
            log.error("deadletter_undecodable", error=str(exc))
            await msg.term()
            continue
        task = state.tasks.get(item.task_id)
        if (task is not None and not task.settled and task.dispatch == item.dispatch
                and task.status in (Status.PENDING, Status.RUNNING)):
            reason = (f"no result after {advisory.deliveries} deliveries (MaxDeliver): every claimant died or "
                      f"went silent; last claim by {task.claimant or 'nobody'}, attempt {task.attempt}")
            record = seal(TaskDeadLettered(id=new_id(), task_id=item.task_id, failures=task.failures, reason=reason))
            state.apply(record[0], record[2].get(subjects.HDR_TRACEPARENT, ""))
            await append([record])
            log.warning("dead_lettered", task_id=item.task_id, seq=record[0].seq, deliveries=advisory.deliveries)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_msg(subjects.WORK_STREAM, advisory.stream_seq)
        await msg.ack()
