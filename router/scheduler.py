"""The DAG scheduler: the router's own decisions, derived from the router state alone.

It is level-triggered. Every record the router folds marks the tasks it touched (and
their parents) dirty; :meth:`Scheduler.decide` looks at the dirty tasks and returns the
events that follow from where they are now:

- a plan step whose dependencies have all completed is assigned to the live agent that
  fits it best (``task_dispatched`` naming the agent; a step playing a role prefers that
  role's agent), highest effective priority first, each agent at most its slots' worth;
  what does not fit waits for a slot there; a step no live agent fits is recorded as
  ``skill_unmatched`` (with a proposed agent) until one appears; a step whose dependency
  failed under ``on_failure = "continue"`` is skipped; a role's step after another
  role's gets a ``handoff`` first;
- a submission held for a match (code ``awaiting_match``: nobody served its skill) goes,
  in the same way, to the live agent that provides its skill best, or waits as
  ``skill_unmatched`` with a proposed agent;
- work assigned to an agent that no longer offers its skill (every instance left) is
  assigned again (``reassigned``); a subtask submitted by a superseded attempt of its
  parent is cancelled;
- a failed task with retries left gets ``task_retry_scheduled``, and is dispatched again
  when its time comes; with its retries spent it is dead-lettered;
- a task whose tree spent more than its budget stops (fails, or is cancelled);
- a plan completes (with its steps' outputs) when every step has settled, and fails as
  soon as a step with ``on_failure = "fail"`` has;
- the open children of a task that ended without completing are cancelled.

The router appends these events to the log before acting on them, folds them, and asks
again until nothing follows. Because the decisions depend on the state and not on which
record arrived last, a router that crashed between a record and its consequences makes
the same decisions after folding the log at start: nothing is lost, nothing repeated.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from ledgerbus.bus import codec
from ledgerbus.bus.events import (
    AgentProposal,
    Handoff,
    SkillUnmatched,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    TaskFailed,
    TaskRetryScheduled,
    new_id,
    step_task_id,
)
from ledgerbus.bus.lifecycle import Status
from ledgerbus.router.live import LiveAgents, fits, match
from ledgerbus.router.state import RouterState
from ledgerbus.router.tasks import AnyTask, PlanState, StepState, TaskState

RouterDecision = (
    TaskDispatched | TaskRetryScheduled | TaskDeadLettered | SkillUnmatched | TaskCancelled | TaskCompleted | TaskFailed
    | Handoff
)
"""An event the scheduler decides; each is about one task."""

log = structlog.get_logger(__name__)

GENERALIST_SKILL = "llm.chat"
"""What a proposal falls back to when no installed skill has the capabilities."""
AGING_S = 30.0
"""A task waiting for its agent gains one priority level every ``AGING_S`` seconds, so a
priority-0 step waits at most about 10 × ``AGING_S`` behind a stream of priority-10 work."""
DEFAULT_PRIORITY = 5
"""The priority of work that names none (a submission held for a match)."""


@dataclass(frozen=True, slots=True)
class _Wanted:
    """A task ready to be assigned to an agent, as the scheduler collects them."""

    task_id: str
    need: list[str]
    skill: str | None
    priority: int
    submitter: str
    reason: str
    role: str = ""


_NAME_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def propose(required: list[str], installed: dict[str, frozenset[str]]) -> AgentProposal:
    """An agent configuration that would serve a step needing ``required``: the best
    installed skill that provides them, else a general LLM agent told what it is for."""
    found = match(required, installed)
    name = _NAME_UNSAFE.sub("-", "-".join(sorted(required)))[:40].strip("-_") or "agent"
    if found is not None:
        skill, _ = found
        prompt = f"Serve work that needs {', '.join(required)} with the {skill} skill."
        return AgentProposal(name=f"{name}-agent", skills=[skill], capabilities=sorted(required), prompt=prompt)
    prompt = (f"You are an agent that can {', '.join(required)}. Do the task you are given with those "
              "capabilities, and say clearly when it is outside them.")
    return AgentProposal(name=f"{name}-agent", skills=[GENERALIST_SKILL], capabilities=sorted(required), prompt=prompt)


class Scheduler:
    """Turns the router state into the router's next events (see the module docstring)."""

    def __init__(
        self,
        live: LiveAgents,
        installed: dict[str, frozenset[str]] | None = None,
        max_output_bytes: int = 256 * 1024,
        may_run: Callable[[str, str], bool] = lambda principal, skill: True,
        aging_s: float = AGING_S,
    ) -> None:
        self.live = live
        self.installed = installed or {}
        self.max_output_bytes = max_output_bytes
        self.may_run = may_run
        """Whether a step submitted by a principal may be matched to a skill (policy)."""
        self.aging_s = aging_s
        """A task waiting for its agent gains one priority level every ``aging_s``."""

    def decide(self, state: RouterState, now: datetime) -> list[RouterDecision]:
        """The events that follow from ``state``'s dirty tasks (at most one per task per
        call). The state is the caller's: the scheduler keeps none of its own."""
        tasks = state.tasks
        if self.live.changed:
            self.live.changed = False
            self._live_changed(state)
        state.due(now)
        out: list[RouterDecision] = []
        touched: set[str] = set()
        wanted: list[_Wanted] = []

        def emit(event: RouterDecision | None) -> None:
            if event is not None and event.task_id not in touched:
                touched.add(event.task_id)
                out.append(event)

        for task_id in state.take_dirty():
            task = tasks.get(task_id)
            if task is None or task_id in touched:
                continue
            parent = tasks.get(task.parent) if task.parent is not None else None
            if parent is not None and _ended_badly(parent) and not task.settled:
                emit(TaskCancelled(id=new_id(), task_id=task_id, reason=f"parent {task.parent} {parent.status}"))
                continue
            if (parent is not None and not task.settled and task.parent_dispatch
                    and parent.dispatch > task.parent_dispatch):
                emit(TaskCancelled(id=new_id(), task_id=task_id, reason=(
                    f"submitted by dispatch {task.parent_dispatch} of {task.parent}, which dispatch "
                    f"{parent.dispatch} superseded")))
                continue
            if isinstance(task, TaskState) and task.handoff is not None and not task.handed:
                sender, role = task.handoff
                emit(Handoff(id=new_id(), task_id=task_id, from_task=task.parent or "", from_role=sender[:128],
                             to_role=role[:128]))
                continue
            if task.over_budget and not task.terminal:
                emit(self._stop_over_budget(task_id, task))
                continue
            if task.over_budget and task.status is Status.COMPLETED:
                for child in task.children:  # done, but its tree still spends: stop what runs under it
                    if not tasks[child].settled:
                        emit(TaskCancelled(id=new_id(), task_id=child, reason=task.over_budget))
            if task.status is Status.FAILED and not task.settled:
                emit(self._after_failure(task_id, task, now))
                continue
            if task.status is Status.RETRYING and task.retry_at is not None and task.retry_at <= now:
                if isinstance(task, StepState) or (isinstance(task, TaskState) and task.matched):
                    wanted.append(self._wanted(task_id, task, "retry"))
                else:  # a plain submission: its skill's shared queue, as it first went
                    emit(TaskDispatched(id=new_id(), task_id=task_id, skill=task.skill, dispatch=task.dispatch + 1,
                                        attempt_base=task.attempt, reason="retry"))
                continue
            if task_id in state.orphaned and task.status in (Status.PENDING, Status.RUNNING):
                wanted.append(self._wanted(task_id, task, "reassigned"))
                continue
            if isinstance(task, TaskState) and task.status in _UNDISPATCHED:
                wanted.append(self._wanted(task_id, task, "matched"))
                continue
            if isinstance(task, PlanState) and task.status is Status.RUNNING:
                events, ready = self._plan(state, task_id, task, touched)
                for event in events:
                    emit(event)
                wanted += ready
            if _ended_badly(task):
                for child in task.children:
                    if not tasks[child].settled:
                        emit(TaskCancelled(id=new_id(), task_id=child, reason=f"parent {task_id} {task.status}"))
        for event in self._assign(state, [w for w in wanted if w.task_id not in touched], now):
            emit(event)
        return out

    def _live_changed(self, state: RouterState) -> None:
        """Agents came, left or changed: what waits for one is looked at again, and work
        assigned to an agent that no longer offers its skill is handed on."""
        for task_id in state.unmatched:
            state.dirty.add(task_id)
            if (parent_id := state.tasks[task_id].parent) is not None:
                state.dirty.add(parent_id)
        state.wake_held()
        if not self.live.ready:
            return
        pools = self.live.pools()
        for agent, assigned in state.inflight.items():
            pool = pools.get(agent)
            for task_id in assigned:
                if pool is None or state.tasks[task_id].skill not in pool.skills:
                    state.orphaned.add(task_id)
                    state.dirty.add(task_id)

    def _wanted(self, task_id: str, task: AnyTask, reason: str) -> _Wanted:
        """What assigning ``task`` takes: the capabilities a step names, else its skill."""
        if isinstance(task, StepState):
            step = task.step
            if step.skill is not None:
                return _Wanted(task_id, [step.skill], step.skill, step.priority, task.submitter, reason, step.role)
            return _Wanted(task_id, list(step.capabilities), None, step.priority, task.submitter, reason, step.role)
        # A submission held for a match: its skill's name is the one capability it needs.
        return _Wanted(task_id, [task.skill], None, DEFAULT_PRIORITY, task.submitter, reason)

    def _assign(self, state: RouterState, wanted: list[_Wanted], now: datetime) -> list[RouterDecision]:
        """Assign ready work to the agents that fit it best, highest effective priority
        first, each agent at most as much as it has slots (work assigned to it and not
        finished holds one); what does not fit now waits for a slot of its agent
        (``state.held``), and what no live agent fits is ``skill_unmatched``.

        Effective priority is the priority plus one for every ``aging_s`` the task has
        waited, so lower-priority work waits a bounded time behind a stream of higher."""
        if not wanted:
            return []
        pools = self.live.pools()
        taken: dict[str, int] = {agent: len(state.inflight.get(agent, ())) for agent in pools}

        def rank(w: _Wanted) -> tuple[int, datetime, str]:
            since = state.ready_since.setdefault(w.task_id, now)
            return -(w.priority + int((now - since).total_seconds() // self.aging_s)), since, w.task_id

        out: list[RouterDecision] = []
        for w in sorted(wanted, key=rank):
            task = state.tasks[w.task_id]
            allowed = ((lambda skill: True) if w.skill is not None
                       else functools.partial(self.may_run, w.submitter))
            found = fits(w.need, pools, taken.__getitem__, w.skill, allowed, prefer=w.role)
            if not found:
                if task.status is not Status.UNMATCHED:
                    out.append(SkillUnmatched(id=new_id(), task_id=w.task_id, capabilities=w.need,
                                              proposal=propose(w.need, self._known_capabilities(state))))
                continue
            best = found[0]
            if best.free <= 0:
                state.held.setdefault(best.agent, set()).add(w.task_id)
                continue
            taken[best.agent] += 1
            out.append(TaskDispatched(id=new_id(), task_id=w.task_id, skill=best.skill, dispatch=task.dispatch + 1,
                                      attempt_base=task.attempt, reason=w.reason,  # type: ignore[arg-type]
                                      score=round(best.score, 4), agent=best.agent))
        return out

    def _stop_over_budget(self, task_id: str, task: AnyTask) -> RouterDecision:
        """A task whose tree spent more than its budget: a running one (or a plan) fails,
        anything else is cancelled; its open subtasks are cancelled after it."""
        error = f"budget exceeded: {task.over_budget}"[:16_384]
        if task.status is Status.RUNNING:
            return TaskFailed(id=new_id(), task_id=task_id, attempt=max(task.attempt, 1), error=error)
        return TaskCancelled(id=new_id(), task_id=task_id, reason=error)

    def _after_failure(self, task_id: str, task: AnyTask, now: datetime) -> RouterDecision:
        if task.retries_left:
            delay = task.retry.delay_s(task.failures)
            return TaskRetryScheduled(id=new_id(), task_id=task_id, failures=task.failures,
                                      not_before=now + timedelta(seconds=delay))
        reason = f"failed {task.failures} of {task.retry.max_attempts} attempts; last error: {task.error}"
        return TaskDeadLettered(id=new_id(), task_id=task_id, failures=task.failures, reason=reason[:16_384])

    def _plan(self, state: RouterState, plan_id: str, plan: PlanState,
              touched: set[str]) -> tuple[list[RouterDecision], list[_Wanted]]:
        """What follows for a running plan: its end, skipped steps, and the steps ready to
        be assigned (returned, for :meth:`_assign` to order with every other plan's)."""
        tasks = state.tasks
        steps = [(cid, step) for cid in plan.children if isinstance(step := tasks[cid], StepState)]
        for _, step in steps:
            if step.settled and step.status not in _FINE and step.step.on_failure == "fail":
                error = f"step {step.step.id} {step.status}: {step.error}"
                return [TaskFailed(id=new_id(), task_id=plan_id, attempt=1, error=error[:16_384])], []
        if all(step.settled for _, step in steps):
            return [TaskCompleted(id=new_id(), task_id=plan_id, attempt=1, output=self._aggregate(steps))], []
        out: list[RouterDecision] = []
        ready: list[_Wanted] = []
        for cid, step in steps:
            if cid in touched or step.status not in _UNDISPATCHED:
                continue
            deps = [d for d in map(tasks.__getitem__, step.deps) if isinstance(d, StepState)]
            if not all(d.settled for d in deps):
                continue
            failed = next((d for d in deps if d.status is not Status.COMPLETED), None)
            if failed is not None:
                out.append(TaskCancelled(id=new_id(), task_id=cid, skipped=True,
                                         reason=f"skipped: step {failed.step.id} {failed.status}"))
                continue
            size = len(codec.encode({d.step.id: d.output for d in deps}))
            if size > 2 * self.max_output_bytes:
                reason = (f"its dependencies' outputs are {size} bytes; a work item carries at most "
                          f"{2 * self.max_output_bytes}")
                out.append(TaskDeadLettered(id=new_id(), task_id=cid, failures=0, reason=reason))
                continue
            before = [d for d in deps if d.step.role]
            if step.step.role and before and not step.handed:
                # A role takes over from the role before it: recorded before its dispatch.
                out.append(Handoff(id=new_id(), task_id=cid, from_task=step_task_id(plan_id, before[-1].step.id),
                                   from_role=before[-1].step.role, to_role=step.step.role))
                continue
            ready.append(self._wanted(cid, step, "matched" if step.step.skill is None else "ready"))
        return out, ready

    def _known_capabilities(self, state: RouterState) -> dict[str, frozenset[str]]:
        known = dict(self.installed)
        for skill, caps in state.registry.items():
            known[skill] = known.get(skill, frozenset()) | caps
        return known

    def _aggregate(self, steps: list[tuple[str, StepState]]) -> dict[str, Any]:
        """The plan's output: each completed step's output, and what became of the others.

        Past the message size limit the outputs are replaced by the steps' task ids (each
        output stays readable on its own task)."""
        outputs = {s.step.id: s.output for _, s in steps if s.status is Status.COMPLETED}
        others = {s.step.id: {"status": str(s.status), "error": s.error}
                  for _, s in steps if s.status is not Status.COMPLETED}
        result: dict[str, Any] = {"outputs": outputs, "failed": others}
        if len(codec.encode(result)) > self.max_output_bytes:
            result = {"outputs": {s.step.id: {"task_id": cid} for cid, s in steps
                                  if s.status is Status.COMPLETED},
                      "failed": others, "truncated": True}
        return result


def _ended_badly(task: AnyTask) -> bool:
    """Ended (for good) without completing: its open children are cancelled."""
    return task.settled and task.status is not Status.COMPLETED


_UNDISPATCHED = frozenset({Status.WAITING, Status.UNMATCHED})
"""Statuses of a step or held submission the scheduler may dispatch (or propose for)."""
_FINE = frozenset({Status.COMPLETED, Status.SKIPPED})
"""Settled statuses of a step that do not fail its plan."""
