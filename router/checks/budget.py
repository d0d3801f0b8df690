"""Budget: a task's token and cost budget, enforced from the usage its claimant reports.

Usage is a fact (the tokens were spent), so a report is never rejected for the budget:
the report that takes the task over is accepted with the code ``budget_exceeded``, and
that record fails the task. Whatever its claimant sends afterwards is refused as
``task_terminal``.
"""

from __future__ import annotations

from bus.events import TaskUsage
from router.checks import Inbound, Learned, learned
from router.state import RouterState


def check(msg: Inbound, state: RouterState) -> Learned | None:
    """Mark a usage report that takes its task over budget."""
    if not isinstance(msg.event, TaskUsage):
        return None
    task = state.tasks.get(msg.event.task_id)
    if task is None or task.budget is None:
        return None
    tokens = task.tokens + msg.event.tokens_in + msg.event.tokens_out
    cost = task.cost_usd + msg.event.cost_usd
    budget = task.budget
    if budget.tokens is not None and tokens > budget.tokens:
        return learned(over_budget=f"{tokens} tokens used of a budget of {budget.tokens}: the task fails")
    if budget.cost_usd is not None and cost > budget.cost_usd:
        return learned(over_budget=f"${cost:.4f} spent of a budget of ${budget.cost_usd:.4f}: the task fails")
    return None
