"""The DAG scheduler: the router's own decisions, derived from the router state alone.

It is level-triggered. Every record the router folds marks the tasks it touched (and
their parents) dirty; :meth:`Scheduler.decide` looks at the dirty tasks and returns the
events that follow from where they are now:

- a plan step whose dependencies have all completed is dispatched (``task_dispatched``),
  highest priority first; a step whose dependency failed under ``on_failure = "continue"``
  is skipped; a step named by capabilities goes to the live skill that fits best, or is
  recorded as ``skill_unmatched`` (with a proposed agent) until one appears;
- a submission held for a match (code ``awaiting_match``: nobody served its skill) goes,
  in the same way, to the live skill that provides its skill best, or waits as
  ``skill_unmatched`` with a proposed agent;
- a failed task with retries left gets ``task_retry_scheduled``, and is dispatched again
  when its time comes; with its retries spent it is dead-lettered;
- a plan completes (with its steps' outputs) when every step has settled, and fails as
  soon as a step with ``on_failure = "fail"`` has;
- the open children of a task that ended without completing are cancelled.

The router appends these events to the log before acting on them, folds them, and asks
again until nothing follows. Because the decisions depend on the state and not on which
record arrived last, a router that crashed between a record and its consequences makes
the same decisions after folding the log at start: nothing is lost, nothing repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext

from bus import codec, subjects
from bus.connection import cancel_requested
from bus.events import (
    AgentProposal,
    Heartbeat,
    SkillUnmatched,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    TaskFailed,
    TaskRetryScheduled,
    new_id,
)
from bus.lifecycle import Status
from router.state import AnyTask, PlanState, RouterState, StepState, TaskState

RouterDecision = (
    TaskDispatched | TaskRetryScheduled | TaskDeadLettered | SkillUnmatched | TaskCancelled | TaskCompleted | TaskFailed
)
"""An event the scheduler decides; each is about one task."""

log = structlog.get_logger(__name__)

GENERALIST_SKILL = "llm.chat"
"""What a proposal falls back to when no installed skill has the capabilities."""


@dataclass(frozen=True, slots=True)
class Offer:
    """One skill as the live agents offer it."""

    capabilities: frozenset[str]
    load: float
    """Running tasks per slot, over every live instance with the skill."""


class LiveAgents:
    """The agents whose heartbeats are in the ``agents`` bucket now (fed by a KV watch).

    The bucket's TTL removes a silent instance's key without telling watchers, so an
    instance whose last heartbeat is older than ``ttl_s`` is dropped here too.
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self._beats: dict[str, Heartbeat] = {}
        self._ttl = timedelta(seconds=ttl_s)
        self.changed = False

    def expire(self, now: datetime) -> None:
        """Forget instances whose heartbeat is older than the TTL."""
        for key in [k for k, beat in self._beats.items() if beat.at < now - self._ttl]:
            self.delete(key)

    def put(self, key: str, beat: Heartbeat) -> None:
        """An instance's heartbeat arrived."""
        old = self._beats.get(key)
        self._beats[key] = beat
        if old is None or old.skills != beat.skills or old.capabilities != beat.capabilities:
            self.changed = True

    def delete(self, key: str) -> None:
        """An instance left, or its heartbeat expired."""
        if self._beats.pop(key, None) is not None:
            self.changed = True

    def skills(self) -> set[str]:
        """Every skill some live instance runs (cheaper than :meth:`offers`: no loads)."""
        return {skill for beat in self._beats.values() for skill in beat.skills}

    def offers(self) -> dict[str, Offer]:
        """Every skill some live instance runs, with its capabilities and load."""
        caps: dict[str, set[str]] = {}
        running: dict[str, int] = {}
        slots: dict[str, int] = {}
        for beat in self._beats.values():
            for skill in beat.skills:
                caps.setdefault(skill, set()).update(beat.capabilities.get(skill, ()))
                running[skill] = running.get(skill, 0) + beat.loads.get(skill, 0)
                slots[skill] = slots.get(skill, 0) + max(beat.concurrency, 1)
        return {s: Offer(frozenset(c), running[s] / slots[s]) for s, c in caps.items()}


def match(required: Iterable[str], offers: dict[str, Offer]) -> tuple[str, float] | None:
    """The skill that best provides every ``required`` capability, and its score.

    A skill provides its own name and its advertised capabilities. Only skills that
    provide all of them are candidates; each scores ``|required| / |provided|`` (1 is an
    exact fit, lower means a broader skill); the best score wins, ties go to the least
    loaded, then to the name.
    """
    need = set(required)
    best: tuple[float, float, str] | None = None
    for skill, offer in offers.items():
        provided = offer.capabilities | {skill}
        if not need <= provided:
            continue
        candidate = (-len(need) / len(provided), offer.load, skill)
        if best is None or candidate < best:
            best = candidate
    return (best[2], -best[0]) if best is not None else None


_NAME_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def propose(required: list[str], installed: dict[str, frozenset[str]]) -> AgentProposal:
    """An agent configuration that would serve a step needing ``required``: the best
    installed skill that provides them, else a general LLM agent told what it is for."""
    found = match(required, {s: Offer(c, 0.0) for s, c in installed.items()})
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
    ) -> None:
        self.live = live
        self.installed = installed or {}
        self.max_output_bytes = max_output_bytes
        self.may_run = may_run
        """Whether a step submitted by a principal may be matched to a skill (policy)."""

    def decide(self, state: RouterState, now: datetime) -> list[RouterDecision]:
        """The events that follow from ``state``'s dirty tasks (at most one per task per
        call). The state is the caller's: the scheduler keeps none of its own."""
        tasks = state.tasks
        if self.live.changed:
            self.live.changed = False
            for task_id in state.unmatched:
                state.dirty.add(task_id)
                if (parent_id := tasks[task_id].parent) is not None:
                    state.dirty.add(parent_id)
        state.due(now)
        out: list[RouterDecision] = []
        touched: set[str] = set()

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
            if task.status is Status.FAILED and not task.settled:
                emit(self._after_failure(task_id, task, now))
                continue
            if task.status is Status.RETRYING and task.retry_at is not None and task.retry_at <= now:
                emit(TaskDispatched(id=new_id(), task_id=task_id, skill=task.skill, dispatch=task.dispatch + 1,
                                    attempt_base=task.attempt, reason="retry"))
                continue
            if isinstance(task, TaskState) and task.status in _UNDISPATCHED:
                emit(self._match_submission(state, task_id, task))
                continue
            if isinstance(task, PlanState) and task.status is Status.RUNNING:
                for event in self._plan(state, task_id, task, touched):
                    emit(event)
            if _ended_badly(task):
                for child in task.children:
                    if not tasks[child].settled:
                        emit(TaskCancelled(id=new_id(), task_id=child, reason=f"parent {task_id} {task.status}"))
        return out

    def _after_failure(self, task_id: str, task: AnyTask, now: datetime) -> RouterDecision:
        if task.retries_left:
            delay = task.retry.delay_s(task.failures)
            return TaskRetryScheduled(id=new_id(), task_id=task_id, failures=task.failures,
                                      not_before=now + timedelta(seconds=delay))
        reason = f"failed {task.failures} of {task.retry.max_attempts} attempts; last error: {task.error}"
        return TaskDeadLettered(id=new_id(), task_id=task_id, failures=task.failures, reason=reason[:16_384])

    def _plan(self, state: RouterState, plan_id: str, plan: PlanState, touched: set[str]) -> list[RouterDecision]:
        tasks = state.tasks
        steps = [(cid, step) for cid in plan.children if isinstance(step := tasks[cid], StepState)]
        for _, step in steps:
            if step.settled and step.status not in _FINE and step.step.on_failure == "fail":
                error = f"step {step.step.id} {step.status}: {step.error}"
                return [TaskFailed(id=new_id(), task_id=plan_id, attempt=1, error=error[:16_384])]
        if all(step.settled for _, step in steps):
            return [TaskCompleted(id=new_id(), task_id=plan_id, attempt=1, output=self._aggregate(steps))]
        out: list[RouterDecision] = []
        ready: list[tuple[int, int, str, StepState]] = []
        for index, (cid, step) in enumerate(steps):
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
            ready.append((-step.step.priority, index, cid, step))
        offers: dict[str, Any] | None = None
        for _, _, cid, step in sorted(ready):
            deps = [d for d in map(tasks.__getitem__, step.deps) if isinstance(d, StepState)]
            size = len(codec.encode({d.step.id: d.output for d in deps}))
            if size > 2 * self.max_output_bytes:
                reason = (f"its dependencies' outputs are {size} bytes; a work item carries at most "
                          f"{2 * self.max_output_bytes}")
                out.append(TaskDeadLettered(id=new_id(), task_id=cid, failures=0, reason=reason))
                continue
            if step.step.skill is not None:
                out.append(TaskDispatched(id=new_id(), task_id=cid, skill=step.step.skill,
                                          dispatch=step.dispatch + 1, attempt_base=step.attempt))
                continue
            if offers is None:
                offers = {s: o for s, o in self.live.offers().items() if self.may_run(plan.submitter, s)}
            found = match(step.step.capabilities, offers)
            if found is not None:
                skill, score = found
                out.append(TaskDispatched(id=new_id(), task_id=cid, skill=skill, dispatch=step.dispatch + 1,
                                          attempt_base=step.attempt, reason="matched", score=round(score, 4)))
            elif step.status is not Status.UNMATCHED:
                out.append(SkillUnmatched(id=new_id(), task_id=cid, capabilities=step.step.capabilities,
                                          proposal=propose(step.step.capabilities, self._known_capabilities(state))))
        return out

    def _match_submission(self, state: RouterState, task_id: str, task: TaskState) -> RouterDecision | None:
        """A submission held for a match: its skill's name is the one capability it needs."""
        need = [task.skill]
        offers = {s: o for s, o in self.live.offers().items() if self.may_run(task.submitter, s)}
        found = match(need, offers)
        if found is not None:
            skill, score = found
            return TaskDispatched(id=new_id(), task_id=task_id, skill=skill, dispatch=task.dispatch + 1,
                                  attempt_base=task.attempt, reason="matched", score=round(score, 4))
        if task.status is Status.UNMATCHED:
            return None  # proposed already: it waits for the live set to change
        return SkillUnmatched(id=new_id(), task_id=task_id, capabilities=need,
                              proposal=propose(need, self._known_capabilities(state)))

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


async def watch_agents(js: JetStreamContext, live: LiveAgents, ready: asyncio.Event | None = None) -> None:
    """Keep ``live`` current from the ``agents`` bucket (heartbeats, with a TTL), for ever;
    a failed watch (reconnect, server restart) is started again, until cancelled.
    ``ready`` is set once the bucket's values at the start have all been read."""
    while not cancel_requested():
        try:
            kv = await js.key_value(subjects.AGENTS_BUCKET)
            watcher = await kv.watchall()
            try:
                async for entry in watcher:
                    if entry is None:
                        if ready is not None:
                            ready.set()
                        continue  # the marker after the initial values
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        live.delete(entry.key)
                        continue
                    try:
                        live.put(entry.key, msgspec.json.decode(entry.value, type=Heartbeat))
                    except Exception as exc:  # noqa: BLE001 - a bad heartbeat must not stop the watch
                        log.warning("heartbeat_undecodable", key=entry.key, error=str(exc))
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reconnects, server restarts: watch again
            log.warning("agents_watch_failed", error=str(exc))
            await asyncio.sleep(1.0)
