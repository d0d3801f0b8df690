"""Lifecycle: task events must fit the task's state as the log has it.

A task id is submitted once; a claim must answer the task's current dispatch (a stale
redelivery of an earlier one is refused); only the agent holding the current claim
(principal and attempt) may report progress or a result, and only while the task runs;
nothing is accepted after a terminal result.
This is what makes "completed exactly once" hold when work is redelivered.

A result may carry its claim (``TaskCompleted.claim``): it is checked as that claim
first, then as a result of the claimant it makes (docs/architecture.md, "Claim and
result together").

A claim must also prove its delivery: it presents the token its work item carried
(``not_delivered`` otherwise), and its sender's identity must have been given the task's
skill (``skill_not_held``), and work assigned to one agent is claimed only by that
agent's instances (``not_assigned``; NATS permissions already keep its queue from every
other identity). A newer attempt number alone supersedes nobody: only a replica that
received a redelivery of the same dispatch holds its token.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from ledgerbus.bus.compaction import no_such
from ledgerbus.bus.events import TaskCompleted, TaskFailed, TaskProgress, TaskStarted, TaskSubmitted, TaskUsage
from ledgerbus.bus.lifecycle import Status, claim_of
from ledgerbus.router.checks import Check, Inbound, Rejection
from ledgerbus.router.claims import ClaimTokens
from ledgerbus.router.state import RouterState
from ledgerbus.router.tasks import PlanState


def make(tokens: ClaimTokens, agent_skills: Callable[[str, str], frozenset[str] | None]) -> Check:
    """The lifecycle check, with the router's claim tokens and the registry's skills."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        """Reject task events that do not follow from the task's current state."""
        claim = claim_of(msg.event)
        if claim is not None:
            # A result carrying its claim is checked as that claim: its claimant is its sender.
            rejection = _follows(msgspec.structs.replace(msg, event=claim), state)
        else:
            rejection = _follows(msg, state)
        if rejection is None and claim is not None:
            rejection = _delivered(msg.principal_token, claim, state, tokens, agent_skills)
        return rejection

    return check


def _delivered(who: str, claim: TaskStarted, state: RouterState, tokens: ClaimTokens,
               agent_skills: Callable[[str, str], frozenset[str] | None]) -> Rejection | None:
    """A claim that fits the task's state: is its sender one that may hold the skill and
    that received this dispatch?"""
    task = state.tasks[claim.task_id]
    skill = task.skill
    if task.agent and who != f"agent-{task.agent}":
        return Rejection("not_assigned", f"task {claim.task_id} dispatch {task.dispatch} is assigned to agent "
                                         f"{task.agent}, not {who}")
    held = agent_skills(who, skill)
    if held is None or skill not in held:
        given = "is not a registered agent" if held is None else f"was given {', '.join(sorted(held)) or 'no skills'}"
        return Rejection("skill_not_held", f"{who} {given}, not {skill}: it cannot have received task {claim.task_id}")
    if not tokens.valid(claim.task_id, claim.dispatch, claim.token):
        what = "carries no claim token" if not claim.token else "presents a claim token that is not this dispatch's"
        return Rejection("not_delivered", f"the claim {what}: {who} did not receive dispatch {claim.dispatch} "
                                          f"of task {claim.task_id}")
    return None


def _follows(msg: Inbound, state: RouterState) -> Rejection | None:
    who = msg.principal_token
    match msg.event:
        case TaskSubmitted(task_id=task_id):
            if task_id in state.tasks:
                return Rejection("duplicate_task", f"task {task_id} was already submitted")
        case TaskStarted(task_id=task_id, attempt=attempt, dispatch=dispatch):
            task = state.tasks.get(task_id)
            if task is None:
                return Rejection("unknown_task", no_such("task", task_id, state.archived_through))
            if task.terminal:
                return Rejection("task_terminal", f"task {task_id} is already {task.status}")
            if task.status is Status.AWAITING_APPROVAL:
                return Rejection("awaiting_approval", f"task {task_id} has not been approved; it was never dispatched")
            if isinstance(task, PlanState):
                return Rejection("not_dispatched", f"task {task_id} is a plan: the router runs it, no agent claims it")
            if task.status not in (Status.PENDING, Status.RUNNING):
                return Rejection("not_dispatched", f"task {task_id} is {task.status}, not dispatched")
            if dispatch != task.dispatch:
                return Rejection(
                    "stale_dispatch", f"the claim answers dispatch {dispatch}; task {task_id} is at dispatch {task.dispatch}"
                )
            if attempt <= task.attempt:
                return Rejection(
                    "stale_attempt", f"attempt {attempt} is not newer than the current claim's {task.attempt}"
                )
        case TaskProgress(task_id=task_id, attempt=attempt) | TaskCompleted(
            task_id=task_id, attempt=attempt
        ) | TaskFailed(task_id=task_id, attempt=attempt) | TaskUsage(task_id=task_id, attempt=attempt):
            task = state.tasks.get(task_id)
            if task is None:
                return Rejection("unknown_task", no_such("task", task_id, state.archived_through))
            if task.terminal:
                return Rejection("task_terminal", f"task {task_id} is already {task.status}")
            if task.status is not Status.RUNNING:
                return Rejection("not_claimant", f"task {task_id} is {task.status}: nobody holds a claim on it")
            if (task.claimant, task.attempt) != (who, attempt):
                return Rejection(
                    "not_claimant",
                    f"{who} attempt {attempt} does not hold task {task_id} "
                    f"(claimed by {task.claimant or 'nobody'} attempt {task.attempt})",
                )
        case _:
            pass
    return None
