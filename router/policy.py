"""The router's policy: ``policy.toml``, reloaded when the file changes, without a restart.

Principal patterns are shell-style (``cli-*``, ``agent-echo-1``); for a principal the
exact name wins, else the longest matching pattern. A policy file that fails to load at
start stops the router; one that fails on reload is logged and the previous policy stays.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import structlog

from ledgerbus.bus.agent_policy import HooksPolicy, SandboxPolicy
from ledgerbus.bus.archive import RetentionRule
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.problems import explain

log = structlog.get_logger(__name__)

T = TypeVar("T")


class RateLimit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token bucket: ``rate`` submissions per second on average, bursts up to ``burst``."""

    rate: float
    burst: int


class Secrets(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What to do with a message that carries a secret: redact it, or reject the message."""

    action: Literal["redact", "reject"] = "redact"


class Approval(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Skills that wait for a person's approval before they run, and who may give it."""

    skills: list[str] = msgspec.field(default_factory=list)
    """skill patterns marked dangerous"""
    approvers: list[str] = msgspec.field(default_factory=list)
    """principal patterns that may approve or deny; nobody approves their own task"""


class Delegation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How far agents may hand work on: subtasks of subtasks, and subtasks of one task."""

    max_depth: int = 4
    """most levels of subtasks under a task a person (or plan) started"""
    max_fanout: int = 32
    """most subtasks one task may submit"""


class Tasks(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What becomes of a submission whose skill nobody serves: no skill of that name is
    installed beside the router and no live agent (heartbeat) offers it."""

    unserved: Literal["warn", "reject", "propose"] = "warn"
    """``warn``: accepted with code ``no_agent`` (it waits in WORK for an agent with the
    skill); ``reject``: rejected with ``no_agent``; ``propose``: accepted with code
    ``awaiting_match``, held until a live skill provides it, with a proposed agent"""


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything ``policy.toml`` may say."""

    skills: dict[str, list[str]] = msgspec.field(default_factory=lambda: {"cli-*": ["*"], "agent-*": ["*"]})
    """principal pattern → the skill patterns it may submit"""
    rate_limits: dict[str, RateLimit] = msgspec.field(default_factory=dict)
    """principal pattern → its token bucket for submissions"""
    secrets: Secrets = msgspec.field(default_factory=Secrets)
    approval: Approval = msgspec.field(default_factory=Approval)
    delegation: Delegation = msgspec.field(default_factory=Delegation)
    tasks: Tasks = msgspec.field(default_factory=Tasks)
    hooks: HooksPolicy = msgspec.field(default_factory=HooksPolicy)
    """read by the agents: deny rules and disabled plugin hooks (agents/hooks.py)"""
    sandbox: SandboxPolicy = msgspec.field(default_factory=SandboxPolicy)
    """read by the agents: the shell and python skills' allowlist, isolation and limits"""
    retention: RetentionRule = msgspec.field(default_factory=RetentionRule)
    """how long AUDIT keeps records live, and the archive they go to (router/retention.py)"""

    def needs_approval(self, skill: str) -> bool:
        """Whether ``skill`` is marked dangerous."""
        return _memo(self, "approval", skill, lambda: any(fnmatch.fnmatchcase(skill, p) for p in self.approval.skills))

    def is_approver(self, principal: str) -> bool:
        """Whether ``principal`` may approve or deny held tasks."""
        return any(fnmatch.fnmatchcase(principal, p) for p in self.approval.approvers)

    def allowed_skills(self, principal: str) -> list[str]:
        """The skill patterns ``principal`` may submit (none if no pattern matches)."""
        return _most_specific(self.skills, principal) or []

    def may_submit(self, principal: str, skill: str) -> bool:
        """Whether ``principal`` may ask for ``skill``."""
        return _memo(self, "submit", f"{principal}\0{skill}", lambda: any(
            fnmatch.fnmatchcase(skill, pattern) for pattern in self.allowed_skills(principal)))

    def rate_limit(self, principal: str) -> tuple[str, RateLimit] | None:
        """The bucket that applies to ``principal`` and the pattern that named it."""
        def find() -> tuple[str, RateLimit] | None:
            for pattern in _by_specificity(self.rate_limits, principal):
                return pattern, self.rate_limits[pattern]
            return None
        return _memo(self, "rate", principal, find)


_MEMO_MAX = 4096
_memos: dict[tuple[int, str, str], tuple[Policy, Any]] = {}


def _memo(policy: Policy, question: str, key: str, answer: Callable[[], T]) -> T:
    """A policy's answer to a question about a principal or skill, worked out once.

    The router asks on every message (which skills a principal may submit, its rate
    bucket, whether a skill needs approval): each a few pattern matches, about 25 µs a
    message together. A policy is frozen, and a reload makes a new one, so an answer holds
    for as long as the policy it came from; the entry keeps that policy, so its ``id``
    cannot be reused while the entry stands. Bounded: cleared when it passes 4,096
    (principals and skills are few; a flood of made-up names only costs the lookups)."""
    slot = (id(policy), question, key)
    found = _memos.get(slot)
    if found is not None and found[0] is policy:
        return found[1]  # type: ignore[no-any-return]
    value = answer()
    if len(_memos) >= _MEMO_MAX:
        _memos.clear()
    _memos[slot] = (policy, value)
    return value


def _by_specificity(table: dict[str, T], principal: str) -> list[str]:
    matching = [p for p in table if fnmatch.fnmatchcase(principal, p)]
    return sorted(matching, key=lambda p: (p != principal, -len(p.replace("*", ""))))


def _most_specific(table: dict[str, T], principal: str) -> T | None:
    matching = _by_specificity(table, principal)
    return table[matching[0]] if matching else None


def load(path: Path) -> Policy:
    """Read and validate a policy file; :class:`ConfigError` names what is wrong."""
    try:
        return msgspec.toml.decode(path.read_bytes(), type=Policy)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"policy {path}: {explain(exc, 'TOML')}") from exc
    except OSError as exc:
        raise ConfigError(f"policy {path}: {exc.strerror}") from exc


class PolicyFile:
    """The policy in force: the file's contents, re-read whenever the file changes.

    No file at start means the built-in defaults. A file that later fails to load, or
    disappears, leaves the previous policy in force: deleting or breaking the file must
    not open anything up.
    """

    def __init__(self, path: Path, check_every_s: float = 1.0) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self._checked_at = time.monotonic()
        self._stamp = self._file_stamp()
        if self._stamp is None:
            log.warning("policy_missing", path=str(path), using="built-in defaults")
            self._policy = Policy()
        else:
            self._policy = load(path)  # a broken policy stops the router at start

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self) -> Policy:
        """The policy now: the file is looked at no more than every ``check_every_s`` and
        re-read only when it changed (several checks ask for it on every message)."""
        now = time.monotonic()
        if now - self._checked_at < self.check_every_s:
            return self._policy
        self._checked_at = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return self._policy
        self._stamp = stamp
        if stamp is None:
            log.error("policy_file_gone", path=str(self.path), keeping="the previous policy")
            return self._policy
        try:
            self._policy = load(self.path)
            log.info("policy_reloaded", path=str(self.path))
        except ConfigError as exc:
            log.error("policy_reload_failed", error=str(exc), keeping="the previous policy")
        return self._policy
