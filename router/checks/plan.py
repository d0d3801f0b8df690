"""Plans and cancellation: a plan must be a runnable DAG before any of it is dispatched.

A plan is rejected, naming the step, when a step names both or neither of a skill and
capabilities, repeats a step id, depends on a step the plan does not have (or on itself),
closes a cycle, names a skill no installation or agent provides or that the sender may
not submit, or when a step's task id ``<plan id>-<step id>`` is too long or already taken.

A subtask (``parent_task_id`` set) must name a task that is still open; an agent may
add subtasks only to the task it holds the claim on; the chain of parents may be at most
``[delegation] max_depth`` long and one task may have at most ``max_fanout`` subtasks.

A proposal is approved once, and must exist. A cancel must name a task that has not ended. A CLI principal (an operator) may cancel
any task; an agent only the tasks it submitted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ledgerbus.bus.compaction import no_such
from ledgerbus.bus.events import Kept, PlanSubmitted, ProposalApproved, RunForked, TaskCancelled, TaskSubmitted
from ledgerbus.bus.plans import validate
from ledgerbus.router.checks import Check, Inbound, Rejection
from ledgerbus.router.policy import Delegation, PolicyFile
from ledgerbus.router.state import RouterState, step_task_id


def make(policy: PolicyFile, installed: Callable[[], Iterable[str]]) -> Check:
    """The plan and cancel check; ``installed`` lists the skills installed here."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        match msg.event:
            case PlanSubmitted(task_id=plan_id) as plan:
                if plan_id in state.tasks:
                    return Rejection("duplicate_task", f"task {plan_id} was already submitted")
                problem = validate(plan, {*installed(), *state.registry})
                if problem is not None:
                    return Rejection("bad_plan", problem)
                for step in plan.steps:
                    if (taken := step_task_id(plan_id, step.id)) in state.tasks:
                        return Rejection("duplicate_task", f"step {step.id!r}: task {taken} already exists")
                if plan.kept and plan.replay is None:
                    return Rejection("bad_plan", "kept steps belong to a fork's plan, which replays a recording"
                                     " (replay is not set)")
                if unknown := sorted(set(plan.kept) - {step.id for step in plan.steps}):
                    return Rejection("bad_plan", f"kept steps not in the plan: {', '.join(unknown)}")
                current = policy.current()
                for step in plan.steps:
                    if step.skill is not None and not current.may_submit(msg.principal_token, step.skill):
                        return Rejection("skill_not_allowed",
                                         f"{msg.principal_token} may not submit {step.skill} (step {step.id!r})")
                if plan.parent_task_id is not None:
                    return _delegation(msg, state, plan.parent_task_id, current.delegation)
            case TaskSubmitted(kept=Kept(), replay=None):
                return Rejection("bad_submission", "a kept subtask belongs to a fork, which replays a recording"
                                 " (replay is not set)")
            case TaskSubmitted(parent_task_id=parent_id) if parent_id is not None:
                return _delegation(msg, state, parent_id, policy.current().delegation)
            case TaskCancelled(task_id=task_id, skipped=skipped):
                if skipped:
                    return Rejection("bad_cancel", "only the router skips plan steps")
                task = state.tasks.get(task_id)
                if task is None:
                    return Rejection("unknown_task", no_such("task", task_id, state.archived_through))
                if task.settled:
                    return Rejection("task_terminal", f"task {task_id} is already {task.status}")
                assert msg.principal is not None
                if msg.principal.kind != "cli" and task.submitter != msg.principal_token:
                    return Rejection("not_submitter", f"{msg.principal_token} did not submit task {task_id}")
            case RunForked(task_id=task_id, source_task_id=source):
                if task_id in state.tasks:
                    return Rejection("duplicate_task", f"task {task_id} was already submitted")
                if task_id == source:
                    return Rejection("bad_fork", "a fork's new task id must differ from its source's")
            case ProposalApproved(proposal_id=proposal_id):
                if proposal_id not in state.proposals:
                    return Rejection("unknown_proposal", no_such("proposal", proposal_id, state.archived_through))
                if proposal_id in state.approved_proposals:
                    return Rejection("already_approved", f"proposal {proposal_id} was already approved")
            case _:
                pass
        return None

    return check


def _delegation(msg: Inbound, state: RouterState, parent_id: str, bounds: Delegation) -> Rejection | None:
    parent = state.tasks.get(parent_id)
    if parent is None:
        return Rejection("unknown_task", no_such("parent task", parent_id, state.archived_through))
    if parent.settled:
        return Rejection("task_terminal", f"parent task {parent_id} is already {parent.status}")
    assert msg.principal is not None
    if msg.principal.kind == "agent" and parent.claimant != msg.principal_token:
        return Rejection("not_claimant", f"{msg.principal_token} does not hold parent task {parent_id}")
    depth, node = 1, parent
    while node.parent is not None and (node := state.tasks[node.parent]) is not None:
        depth += 1
    if depth > bounds.max_depth:
        return Rejection("delegation_too_deep",
                         f"a subtask of {parent_id} would be {depth} levels deep; policy allows {bounds.max_depth}")
    if len(parent.children) >= bounds.max_fanout:
        return Rejection("fanout_exceeded",
                         f"task {parent_id} already has {len(parent.children)} subtasks; policy allows {bounds.max_fanout}")
    return None
