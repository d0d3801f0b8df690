"""Dispatch: turn accepted submissions into work items on ``work.<skill>``.

Each publish carries ``Nats-Msg-Id = work-<task id>``, so dispatching the same task
again (after a crash between dispatch and ingress ack) is de-duplicated by JetStream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from bus import codec, subjects
from bus.events import AuditRecord, TaskApproved, TaskSubmitted, WorkItem
from router.state import RouterState


def work_item(record: AuditRecord, state: RouterState) -> WorkItem | None:
    """The work an accepted record asks for, if any: a submission that is not held, or
    the approval of one that was (its submission is kept in the router state)."""
    if not record.accepted or record.code != "ok":
        return None
    match record.event:
        case TaskSubmitted() as submission:
            submitted_by = record.principal
        case TaskApproved(task_id=task_id):
            task = state.tasks.get(task_id)
            if task is None or task.held is None:
                return None
            submission, submitted_by = task.held, task.submitter
        case _:
            return None
    return WorkItem(
        task_id=submission.task_id,
        skill=submission.skill,
        input=submission.input,
        timeout_s=submission.timeout_s,
        audit_seq=record.seq,
        submitted_by=submitted_by,
    )


async def dispatch(
    js: JetStreamContext, items: list[tuple[WorkItem, dict[str, str]]]
) -> list[BaseException | None]:
    """Publish work items (pipelined) and wait for WORK to store them.

    Returns, per item, ``None`` if stored or the error that stopped it (WORK full, no
    connection): the caller leaves that message unacked so it is tried again.
    """
    futures: list[asyncio.Future[Any] | BaseException] = []
    for item, headers in items:
        hdrs = dict(headers)
        hdrs[subjects.HDR_MSG_ID] = subjects.work_msg_id(item.task_id)
        try:
            futures.append(await js.publish_async(subjects.work(item.skill), codec.encode(item), headers=hdrs))
        except nats.errors.Error as exc:
            futures.append(exc)
    results: list[BaseException | None] = []
    for fut in futures:
        if isinstance(fut, BaseException):
            results.append(fut)
            continue
        try:
            await fut
            results.append(None)
        except (TimeoutError, nats.errors.Error) as exc:
            results.append(exc)
    return results
