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

from bus.events import PlanSubmitted, ProposalApproved, TaskCancelled, TaskSubmitted
from router.checks import Check, Inbound, Rejection
from router.policy import Delegation, PolicyFile
from router.state import RouterState, step_task_id

MAX_ID = 64


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path ``a → b → … → a``, or ``None`` if the graph is a DAG."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in deps:
        if state.get(root):
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[node] = 1
                path.append(node)
            children = deps.get(node, [])
            if i < len(children):
                stack.append((node, i + 1))
                child = children[i]
                if state.get(child) == 1:
                    return [*path[path.index(child):], child]
                if not state.get(child):
                    stack.append((child, 0))
            else:
                state[node] = 2
                path.pop()
    return None


def validate(plan: PlanSubmitted, known_skills: Iterable[str]) -> str | None:
    """What is wrong with the plan's shape, or ``None`` (the checks that need no state)."""
    ids: set[str] = set()
    for step in plan.steps:
        if step.id in ids:
            return f"step id {step.id!r} is used twice"
        ids.add(step.id)
    known = set(known_skills)
    for step in plan.steps:
        if (step.skill is None) == (not step.capabilities):
            return f"step {step.id!r} must name either a skill or capabilities, not {'both' if step.skill else 'neither'}"
        if step.skill is not None and step.skill not in known:
            shown = ", ".join(sorted(known)) or "none"
            return f"step {step.id!r} names unknown skill {step.skill!r} (known: {shown})"
        for dep in step.deps:
            if dep == step.id:
                return f"step {step.id!r} depends on itself"
            if dep not in ids:
                return f"step {step.id!r} depends on {dep!r}, which is not a step of this plan"
        if len(step_task_id(plan.task_id, step.id)) > MAX_ID:
            return (f"step {step.id!r}: its task id {step_task_id(plan.task_id, step.id)!r} is longer than "
                    f"{MAX_ID} characters (use a shorter plan or step id)")
    cycle = find_cycle({s.id: list(s.deps) for s in plan.steps})
    if cycle is not None:
        return "dependency cycle: " + " -> ".join(cycle)
    return None


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
                current = policy.current()
                for step in plan.steps:
                    if step.skill is not None and not current.may_submit(msg.principal_token, step.skill):
                        return Rejection("skill_not_allowed",
                                         f"{msg.principal_token} may not submit {step.skill} (step {step.id!r})")
            case TaskSubmitted(parent_task_id=parent_id) if parent_id is not None:
                return _delegation(msg, state, parent_id, policy.current().delegation)
            case TaskCancelled(task_id=task_id, skipped=skipped):
                if skipped:
                    return Rejection("bad_cancel", "only the router skips plan steps")
                task = state.tasks.get(task_id)
                if task is None:
                    return Rejection("unknown_task", f"no task {task_id}")
                if task.settled:
                    return Rejection("task_terminal", f"task {task_id} is already {task.status}")
                assert msg.principal is not None
                if msg.principal.kind != "cli" and task.submitter != msg.principal_token:
                    return Rejection("not_submitter", f"{msg.principal_token} did not submit task {task_id}")
            case ProposalApproved(proposal_id=proposal_id):
                if proposal_id not in state.proposals:
                    return Rejection("unknown_proposal", f"no proposal {proposal_id}")
                if proposal_id in state.approved_proposals:
                    return Rejection("already_approved", f"proposal {proposal_id} was already approved")
            case _:
                pass
        return None

    return check


def _delegation(msg: Inbound, state: RouterState, parent_id: str, bounds: Delegation) -> Rejection | None:
    parent = state.tasks.get(parent_id)
    if parent is None:
        return Rejection("unknown_task", f"no parent task {parent_id}")
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
