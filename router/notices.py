"""What the router tells an agent directly, once the record that decides it is stored: a
claim's verdict (the claimant waits for it before it runs the skill) and a cancel (a task
it runs was cancelled, or failed by the router).

Best effort, on core NATS (``notify.agent.<name>.claim``, ``….cancel``): an agent that
misses a notice has its fallbacks (a claim unanswered within ``claim_timeout_s`` hands the
message back; the result of a cancelled task is refused by the lifecycle check).
"""

from __future__ import annotations

from collections.abc import Sequence

import nats.errors
import structlog
from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import TaskCancelled, TaskFailed
from ledgerbus.bus.messages import Notice
from ledgerbus.bus.records import AuditRecord
from ledgerbus.router.state import RouterState

log = structlog.get_logger(__name__)


async def notify(nc: Client, principal: str, topic: str, notice: Notice) -> None:
    """Tell an agent something directly; nothing for a principal that is not an agent."""
    if not principal.startswith("agent-"):
        return
    try:
        await nc.publish(subjects.notify(subjects.parse_principal(principal), topic), codec.encode(notice))
    except (nats.errors.Error, subjects.SubjectError) as exc:
        log.warning("notify_failed", principal=principal, topic=topic, error=str(exc))


async def claims(nc: Client, records: Sequence[AuditRecord]) -> None:
    """The verdict on each claim (``task_started``) among ``records``, to its claimant."""
    for record in records:
        if record.kind == "task_started" and record.event is not None:
            await notify(nc, record.principal, "claim", Notice(
                task_id=record.key, msg_id=record.msg_id, verdict=record.verdict, code=record.code,
                reason=record.reason, seq=record.seq,
            ))


async def cancels(nc: Client, state: RouterState, records: Sequence[AuditRecord]) -> None:
    """A cancel to the claimant of each task that ``records`` cancel, or that the router
    failed (its tree's budget spent), while an agent runs it."""
    for record in records:
        if record.accepted and (isinstance(record.event, TaskCancelled) or (
                record.principal == "router" and isinstance(record.event, TaskFailed))):
            task = state.tasks.get(record.event.task_id)
            if task is not None and task.claimant:
                await notify(nc, task.claimant, "cancel", Notice(
                    task_id=record.event.task_id, msg_id=record.msg_id, verdict=record.verdict,
                    code="cancelled", seq=record.seq,
                    reason=record.event.reason if isinstance(record.event, TaskCancelled) else record.event.error,
                ))
