"""Plan shape: the checks of a plan that need nothing but the plan (and the skill names
known), shared by the router (which repeats them on every plan), ``agentctl submit
--plan`` (which says them before sending) and the ``plan`` skill (which feeds them back
to the model that wrote the plan)."""

from __future__ import annotations

from collections.abc import Iterable

from ledgerbus.bus.events import PlanSubmitted, step_task_id

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
