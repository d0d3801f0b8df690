"""Bounded state: which tasks an ``audit_archived`` record lets go of, defined once.

The router's state (``router/state.py``) and the projections (``projections/tasks.py`` and
the tables that follow it) both fold the log, and both must drop exactly the same tasks at
the same record, or a rebuild would differ from the live tables and a snapshot from a fold
(docs/architecture.md, "Retention and archives", step 5). So the rule is here, as the
lifecycle is in :mod:`bus.lifecycle`:

- a **tree** is a top-level task with everything under it: a plan's steps, the subtasks a
  skill submitted or delegated to or handed over to (all linked by their parent);
- on an accepted ``audit_archived`` record with ``through_seq`` C, a tree whose every task
  is *settled* and whose every task's last accepted record is at or before C is dropped
  whole; a tree with anything open, or touched after C, stays whole.

*Settled* is :func:`bus.lifecycle.settled` with ``retryable`` as the log shows it
(:func:`stops_retries`): a task may be retried if its policy allows more than one attempt,
until a usage report takes it over its budget or the router fails it (both end its retries
in the router too). That is never looser than the router's own view of a task, so nothing
the router would still act on is dropped.

Rejected records change nothing, so they do not hold a task back: a late result refused
after C leaves its refusal in AUDIT (and in ``audit_index``), not the task.

Neither fold looks at every task it holds. A tree still held after an archive was open then
(or touched after its cut), and only a record can change that, which touches a task of the
tree. So the trees an archive at C can let go of are those with a task whose last record
is after the previous archive's cut and at or before C: :func:`trees` finds them from those
tasks, and :func:`closed` decides each task. The cost of an archive follows what happened
since the last one, not how much is held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ledgerbus.bus.events import TaskFailed, TaskUsage
from ledgerbus.bus.lifecycle import BUDGET_EXCEEDED, Status, settled
from ledgerbus.bus.records import AuditRecord

ARCHIVED = "audit_archived"
"""The kind of the router's record that moves records ``1..through_seq`` to the archive."""
EXPIRED = "archive_expired"
"""The kind of the router's record that deletes archive segments (it changes no state)."""
ROUTER = "router"


def archived_through(record: AuditRecord) -> int | None:
    """``through_seq`` of an accepted ``audit_archived`` record by the router; ``None`` for
    any other record (an ``archive_expired`` one included)."""
    retention = record.retention
    if retention is None or retention.action != "archived" or not record.accepted or record.principal != ROUTER:
        return None
    return retention.through_seq


def stops_retries(record: AuditRecord) -> bool:
    """Whether an accepted task record ends its task's retries: a usage report that took it
    over budget, or the router failing it (a plan, or a task whose tree's budget is spent)."""
    if not record.accepted:
        return False
    event = record.event
    return ((isinstance(event, TaskUsage) and record.code == BUDGET_EXCEEDED)
            or (isinstance(event, TaskFailed) and record.principal == ROUTER))


def closed(status: Status, retryable: bool, last_seq: int, through_seq: int) -> bool:
    """Whether one task may leave with its tree: settled, and untouched after ``through_seq``."""
    return last_seq <= through_seq and settled(status, retryable)


def trees(candidates: Iterable[str], parent: Callable[[str], str | None],
          children: Callable[[str], Iterable[str]]) -> list[list[str]]:
    """The trees that hold ``candidates``, each once, as its root and everything under it.
    ``parent`` names a task's parent if that is held (else ``None``: the task is a root);
    ``children`` lists a held task's children."""
    roots: dict[str, None] = {}
    for task_id in candidates:
        up = parent(task_id)
        if up is None:  # most tasks: their own root
            roots[task_id] = None
            continue
        current, seen = task_id, {task_id}
        while up is not None and up not in seen:
            seen.add(up)
            current, up = up, parent(up)
        roots[current] = None
    out: list[list[str]] = []
    for root in roots:
        below = children(root)
        if not below:  # most trees: one task
            out.append([root])
            continue
        members = [root]
        visited = {root}
        stack = list(below)
        while stack:
            task_id = stack.pop()
            if task_id not in visited:
                visited.add(task_id)
                members.append(task_id)
                stack.extend(children(task_id))
        out.append(members)
    return out


def no_such(what: str, name: str, through_seq: int) -> str:
    """The reason a message naming a task (or proposal) nobody holds is refused, or a query
    finds none: once records are archived, it may have been one that settled by then."""
    if not through_seq:
        return f"no {what} {name}"
    whose = "its task" if what == "proposal" else "it"
    return (f"no {what} {name}: none was made, or {whose} settled by seq {through_seq} and was archived "
            f"(records 1..{through_seq} are in the audit archive, not in the live log)")
