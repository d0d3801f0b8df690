"""Approval: submissions of skills marked dangerous wait for a person.

Such a submission is accepted but *held*: its audit record has the code
``approval_requested`` and nothing is dispatched (a plan with one such step is held
whole). ``TaskApproved`` from an approver
(policy ``[approval] approvers``) dispatches it; ``TaskDenied`` ends it, and it never
reaches WORK. Nobody approves or denies a task they submitted themselves.
"""

from __future__ import annotations

from ledgerbus.bus.compaction import no_such
from ledgerbus.bus.events import PlanSubmitted, TaskApproved, TaskDenied, TaskSubmitted
from ledgerbus.bus.lifecycle import Status
from ledgerbus.router.checks import Check, Inbound, Learned, Rejection, learned
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState


def make(policy: PolicyFile) -> Check:
    """The approval gate, reading the policy in force at each message."""

    def check(msg: Inbound, state: RouterState) -> Rejection | Learned | None:
        match msg.event:
            case TaskSubmitted(skill=skill, kept=None):
                return learned(held=True) if policy.current().needs_approval(skill) else None
            case PlanSubmitted(steps=steps):
                # One dangerous step holds the whole plan: nothing of it runs unapproved.
                current = policy.current()
                held = any(s.skill is not None and current.needs_approval(s.skill) for s in steps)
                return learned(held=True) if held else None
            case TaskApproved(task_id=task_id) | TaskDenied(task_id=task_id):
                task = state.tasks.get(task_id)
                verb = "approve" if isinstance(msg.event, TaskApproved) else "deny"
                if task is None:
                    return Rejection("unknown_task", no_such("task", task_id, state.archived_through))
                if task.status is not Status.AWAITING_APPROVAL:
                    return Rejection("not_awaiting_approval", f"task {task_id} is {task.status}, not awaiting approval")
                if not policy.current().is_approver(msg.principal_token):
                    return Rejection("not_an_approver", f"{msg.principal_token} may not {verb} tasks")
                if msg.principal_token == task.submitter:
                    return Rejection("self_approval", f"{msg.principal_token} submitted task {task_id} and may not {verb} it")
            case _:
                pass
        return None

    return check
