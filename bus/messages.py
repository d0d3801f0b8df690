"""What travels on the bus besides events and audit records: the router's
:class:`WorkItem` (a task dispatched to ``work.<skill>``) and :class:`Notice` (its word to
one agent), and an agent's :class:`Heartbeat` (in the ``agents`` bucket).

Their schemas only grow, as the events' do: a new field always has a default.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from ledgerbus.bus.events import Budget, Replay


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """What an agent instance writes to the ``agents`` bucket every heartbeat interval;
    the bucket's TTL removes an instance that stops writing."""

    agent: str
    instance: str
    skills: list[str]
    concurrency: int
    load: int
    at: datetime
    capabilities: dict[str, list[str]] = msgspec.field(default_factory=dict)
    """skill → the capabilities it provides"""
    loads: dict[str, int] = msgspec.field(default_factory=dict)
    """skill → how many of its tasks this instance is running"""


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """The router's word to one agent on ``notify.agent.<name>.<topic>``: the verdict on a
    claim it sent (``claim``), or that a task it runs was cancelled (``cancel``)."""

    task_id: str
    msg_id: str = ""
    verdict: str = ""
    code: str = ""
    reason: str = ""
    seq: int = 0


class WorkItem(msgspec.Struct, frozen=True, kw_only=True):
    """A task dispatched to ``work.<skill>``, pulled by an agent that has the skill."""

    task_id: str
    skill: str
    input: dict[str, Any]
    timeout_s: float
    audit_seq: int
    submitted_by: str
    dispatch: int = 1
    attempt_base: int = 0
    parent_task_id: str | None = None
    step: str = ""
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    """A plan step's dependencies (step id → output): exactly the steps it depends on."""
    token: str = ""
    """The claim token of this dispatch, which the claim must present (router/claims.py)."""
    agent: str = ""
    """The agent it was assigned to (``assign.<agent>.<skill>``); empty: the skill's
    shared queue (``work.<skill>``)."""
    budget_left: Budget | None = None
    """What the budgets over this task (its own and its ancestors') had left when it was
    dispatched, the tightest of them: an LLM call that would cross it is not made."""
    budget_owner: str = ""
    """The task whose budget ``budget_left`` is."""
    path: str = ""
    """The task's place in its tree, from the root (``plan/design``, ``reason/echo.2``):
    the same in a re-run or a fork of the tree, so recorded LLM calls can be matched to it."""
    replay: Replay | None = None
    """Answer its LLM calls from this recording (see :class:`Replay`)."""
