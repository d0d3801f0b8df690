"""Budget: token and cost budgets over task trees, enforced from the usage claimants report.

A budget set on a task, a plan or a pipeline covers its whole tree: the task itself and
every subtask, plan and step under it. Usage is a fact (the tokens were spent), so a report
is never rejected for a budget: the report that takes a tree over its budget is accepted
with the code ``budget_exceeded``, naming whose budget it is. That record fails the task
that reported it, and when the budget is an ancestor's, the scheduler stops that ancestor
too (it fails, or, already completed, has its open subtasks cancelled), with everything
under it. Whatever a stopped task's claimant sends afterwards is refused as
``task_terminal``. Agents check before an LLM call whether its most could cross what was
left at dispatch (``WorkItem.budget_left``), so most crossings never happen.
"""

from __future__ import annotations

from ledgerbus.bus.events import TaskUsage
from ledgerbus.router.checks import Inbound, Learned, learned
from ledgerbus.router.state import RouterState


def check(msg: Inbound, state: RouterState) -> Learned | None:
    """Mark a usage report that takes its task's tree, or an ancestor's, over budget."""
    if not isinstance(msg.event, TaskUsage):
        return None
    usage = msg.event
    tokens_now, cost_now = usage.tokens_in + usage.tokens_out, usage.cost_usd
    for task_id, node in state.lineage(usage.task_id):
        budget = node.budget
        if budget is None:
            continue
        whose = ("the task fails" if task_id == usage.task_id
                 else f"task {task_id} and everything under it stop")
        under = "" if task_id == usage.task_id and not node.children else f" under task {task_id}"
        tokens = node.tree_tokens + tokens_now
        if budget.tokens is not None and tokens > budget.tokens:
            return learned(over_budget=f"{tokens} tokens used{under} of a budget of {budget.tokens}: {whose}")
        cost = node.tree_cost_usd + cost_now
        if budget.cost_usd is not None and cost > budget.cost_usd:
            return learned(over_budget=f"${cost:.4f} spent{under} of a budget of ${budget.cost_usd:.4f}: {whose}")
    return None
