"""Dispatch: turn accepted submissions and the scheduler's dispatches into work items on
``work.<skill>`` (a skill's shared queue) or ``assign.<agent>.<skill>`` (an assigned agent's).

Each publish carries ``Nats-Msg-Id = work-<task id>`` (``#<n>`` for the n-th dispatch),
so dispatching the same task again (after a crash between dispatch and ingress ack) is
de-duplicated by JetStream; past its window, a second copy's claim is refused.
"""

from __future__ import annotations

import structlog

from ledgerbus.bus import codec, lifecycle, paths, subjects
from ledgerbus.bus.events import TaskApproved, TaskSubmitted
from ledgerbus.bus.lifecycle import NO_AGENT
from ledgerbus.bus.messages import WorkItem
from ledgerbus.bus.publish import Publisher
from ledgerbus.bus.records import AuditRecord
from ledgerbus.router.claims import ClaimTokens
from ledgerbus.router.records import trace_headers
from ledgerbus.router.state import RouterState
from ledgerbus.router.tasks import AnyTask, StepState, TaskState

log = structlog.get_logger(__name__)


def work_item(record: AuditRecord, state: RouterState, tokens: ClaimTokens) -> WorkItem | None:
    """The work an accepted record asks for, if any: a submission that is not held, or
    the approval of one that was (its submission is kept in the router state). It carries
    the claim token of its dispatch (the first). A submission nobody serves (``no_agent``)
    goes to WORK all the same and waits there for an agent with its skill; one held for a
    match is the scheduler's to dispatch."""
    if not record.accepted or record.code not in ("ok", NO_AGENT):
        return None
    match record.event:
        case TaskSubmitted(kept=None) as submission:
            submitted_by = record.principal
        case TaskApproved(task_id=task_id):
            task = state.tasks.get(task_id)
            if not isinstance(task, TaskState) or task.held is None:
                return None  # a plan's steps are dispatched by the scheduler
            submission, submitted_by = task.held, task.submitter
        case _:
            return None
    budget_left, owner = state.budget_left(submission.task_id)
    return WorkItem(
        task_id=submission.task_id,
        skill=submission.skill,
        input=submission.input,
        timeout_s=submission.timeout_s,
        audit_seq=record.seq,
        submitted_by=submitted_by,
        parent_task_id=submission.parent_task_id,
        token=tokens.token(submission.task_id, 1),
        budget_left=budget_left, budget_owner=owner,
        path=path_of(submission.task_id, state), replay=submission.replay,
    )


MAX_PATH_DEPTH = 32


def path_of(task_id: str, state: RouterState) -> str:
    """Where a task sits in its tree (:mod:`bus.paths`), from the tasks the state holds (a
    task whose parent an archive let go of counts as a root)."""
    chain: list[tuple[str, AnyTask]] = []
    current: str | None = task_id
    while current is not None and len(chain) < MAX_PATH_DEPTH and (task := state.tasks.get(current)) is not None:
        chain.append((current, task))
        current = task.parent
    if not chain:
        return ""
    above = chain[-1][1]
    path = above.skill
    for tid, task in reversed(chain[:-1]):
        if isinstance(task, StepState):
            path = paths.below(path, task.skill, 0, task.step.id)
        else:
            same = [c for c in above.children if (s := state.tasks.get(c)) is not None and s.skill == task.skill]
            path = paths.below(path, task.skill, same.index(tid) + 1 if tid in same else len(same))
        above = task
    return path


def routed_work_item(task_id: str, state: RouterState, tokens: ClaimTokens) -> WorkItem | None:
    """The work item of the scheduler's current dispatch of a task: a plan step (with its
    dependencies' outputs as context) or a retry of a submission."""
    budget_left, owner = state.budget_left(task_id)
    match state.tasks.get(task_id):
        case StepState(status=lifecycle.Status.PENDING, step=step, deps=deps) as task:
            context = {dep.step.id: dep.output for dep in map(state.tasks.__getitem__, deps)
                       if isinstance(dep, StepState)}
            return WorkItem(
                task_id=task_id, skill=task.skill, input=step.input, timeout_s=step.timeout_s,
                audit_seq=task.dispatch_seq, submitted_by=task.submitter, dispatch=task.dispatch,
                attempt_base=task.attempt, parent_task_id=task.parent, step=step.id, context=context,
                token=tokens.token(task_id, task.dispatch), agent=task.agent,
                budget_left=budget_left, budget_owner=owner, path=path_of(task_id, state), replay=task.replay,
            )
        case TaskState(status=lifecycle.Status.PENDING, submission=TaskSubmitted() as sub) as task:
            return WorkItem(
                task_id=task_id, skill=task.skill, input=sub.input, timeout_s=sub.timeout_s,
                audit_seq=task.dispatch_seq, submitted_by=task.submitter, dispatch=task.dispatch,
                attempt_base=task.attempt, parent_task_id=sub.parent_task_id,
                token=tokens.token(task_id, task.dispatch), agent=task.agent,
                budget_left=budget_left, budget_owner=owner, path=path_of(task_id, state), replay=task.replay,
            )
    return None


def work_subject(item: WorkItem) -> str:
    """Where a work item goes: the queue of the agent it was assigned to, or its skill's."""
    return subjects.assigned(item.agent, item.skill) if item.agent else subjects.work(item.skill)


async def dispatch(
    publisher: Publisher, items: list[tuple[WorkItem, dict[str, str]]]
) -> list[BaseException | None]:
    """Publish work items (pipelined) and wait for WORK to store them.

    Returns, per item, ``None`` if stored or the error that stopped it (WORK full, no
    connection, no PubAck in time): the caller leaves that message unacked so it is tried
    again. The headers given carry the trace context of the hop that decided the dispatch
    (``router.process`` or ``router.decide``), which the WORK message names as the agent's
    parent: the publish has no span of its own (one span per hop).
    """
    messages = []
    for item, headers in items:
        hdrs = dict(headers)
        hdrs[subjects.HDR_MSG_ID] = subjects.work_msg_id(item.task_id, item.dispatch)
        messages.append((work_subject(item), codec.encode(item), hdrs))
    return [outcome if isinstance(outcome, BaseException) else None for outcome in await publisher.publish(messages)]


async def deliver(publisher: Publisher, state: RouterState, tokens: ClaimTokens, undelivered: set[str]) -> set[str]:
    """Publish the work items of the router's own dispatches of ``undelivered`` tasks, in
    the order they were decided (highest priority first: a queue is delivered in the order
    it was published); return the tasks whose item is not known to be stored."""
    if not undelivered:
        return undelivered
    # A task an archive let go of meanwhile has nothing left to deliver.
    order = sorted((task_id for task_id in undelivered if task_id in state.tasks),
                   key=lambda task_id: (state.tasks[task_id].dispatch_seq, task_id))
    items: list[tuple[WorkItem, dict[str, str]]] = [
        (item, trace_headers(state.tasks[task_id].dispatch_trace)) for task_id in order
        if (item := routed_work_item(task_id, state, tokens)) is not None
    ]
    results = await dispatch(publisher, items)
    failed = {item.task_id for (item, _), err in zip(items, results, strict=True) if err is not None}
    for task_id in failed:
        log.warning("dispatch_failed", task_id=task_id)
    return failed
