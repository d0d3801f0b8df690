"""The check pipeline: one module per check, run in a fixed order on every message.

A check takes the :class:`Inbound` message and the router state and returns ``None`` to
pass it on, :class:`Learned` to pass it on with what it found out (the decoded event, the
secrets it redacted, that the task is held...), or a :class:`Rejection` with a
machine-readable code and a reason for people. Checks never change the message they are
given: :func:`run_checks` makes the next one from what each learned, so a check reads
exactly what the checks before it decided. The first rejection wins; every message,
whatever its fate, gets one audit record.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ledgerbus.bus.events import AnyEvent
from ledgerbus.bus.redaction import scrub
from ledgerbus.bus.subjects import Principal
from ledgerbus.router.claims import ClaimTokens
from ledgerbus.router.policy import PolicyFile
from ledgerbus.router.state import RouterState

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("ledgerbus.router")


class Inbound(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One INGRESS message as the checks see it, with what the checks before learned.

    A struct, not a dataclass: :func:`run_checks` makes a new one for each check that
    learned something, two or three per message, and a frozen dataclass's ``replace``
    took 3 µs of Python each where ``msgspec.structs.replace`` takes a fraction of one."""

    subject: str
    data: bytes
    headers: dict[str, str]
    ingress_seq: int
    delivery: int
    kind_token: str = ""
    received_at: float = 0.0
    """When JetStream stored the message in INGRESS (POSIX seconds)."""
    principal: Principal | None = None
    event: AnyEvent | None = None
    secrets: tuple[str, ...] = ()
    """Kinds of secret redacted from the event by the secrets scan."""
    held: bool = False
    """Accepted, but held for approval (a dangerous skill)."""
    over_budget: str = ""
    """Accepted usage that takes its task over budget (and so fails it): why."""
    unserved: str = ""
    """Accepted, but nobody serves the submission's skill: why (see :mod:`router.checks.unserved`)."""
    await_match: bool = False
    """Accepted, but held for the scheduler to match it to a live skill (and propose an agent)."""

    @property
    def principal_token(self) -> str:
        """The sender as one word (``agent-echo-1``), once the subject check has read it."""
        return self.principal.token if self.principal is not None else ""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was rejected: ``code`` for machines, ``reason`` for people; and what
    the rejecting check learned that the record must show (the redacted bytes)."""

    code: str
    reason: str
    learned: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Learned:
    """What a passing check found out, as new values of :class:`Inbound` fields."""

    changes: Mapping[str, Any]


def learned(**changes: Any) -> Learned:
    """``return learned(event=..., secrets=...)`` from a check that found something out."""
    return Learned(changes)


Check = Callable[[Inbound, RouterState], Rejection | Learned | None]


@functools.cache
def check_name(check: Check) -> str:
    """A check's name in spans and logs: its module (``size``), plus the function's name
    when a module has more than one (``secrets.scan``)."""
    module = getattr(check, "__module__", "") or ""
    name = module.rsplit(".", 1)[-1] or repr(check)
    func = getattr(check, "__name__", "check")
    return name if func == "check" else f"{name}.{func}"


def run_checks(
    checks: Sequence[Check], msg: Inbound, state: RouterState, trace_passing: bool = True,
    span: trace.Span | None = None,
) -> tuple[Inbound, Rejection | None]:
    """Run ``checks`` in order; return the message with all they learned, and the first
    rejection (``None`` if all pass).

    When ``span`` (the message's ``router.process``; default: the current span) records,
    each check becomes a ``router.check <name>`` span under it, a rejecting one with an
    error status; with ``trace_passing`` false, only a rejecting one does (spans are most of
    what tracing costs the router: see docs/observability.md). The spans are made after the
    fact from two clock readings, and not at all for an unsampled message.

    A check that raises is a bug, but it must not take the router down or lose the
    message: the message is rejected as ``internal_error`` (and so still gets its one
    audit record), and the traceback is logged.
    """
    if span is None:
        span = trace.get_current_span()
    traced = span.is_recording()
    for check in checks:
        started = time.time_ns() if traced else 0
        error: Exception | None = None
        try:
            outcome = check(msg, state)
        except Exception as exc:
            with trace.use_span(span, end_on_exit=False):  # the log line names the message's trace
                log.exception("check_raised", check=check_name(check), subject=scrub(msg.subject))
            outcome = Rejection("internal_error", f"a router check failed on this message ({type(exc).__name__})")
            error = exc
        rejection = outcome if isinstance(outcome, Rejection) else None
        if traced and (trace_passing or rejection is not None):
            _check_span(span, check_name(check), started, rejection, error)
        if isinstance(outcome, Learned):
            msg = msgspec.structs.replace(msg, **outcome.changes)
        elif rejection is not None:
            return (msgspec.structs.replace(msg, **rejection.learned) if rejection.learned else msg), rejection
    return msg, None


def _check_span(parent: trace.Span, name: str, started: int, rejection: Rejection | None,
                error: Exception | None) -> None:
    span = tracer.start_span(f"router.check {name}", context=trace.set_span_in_context(parent), start_time=started,
                             attributes={"ledgerbus.check": name})
    if error is not None:
        span.record_exception(error)
    if rejection is not None:
        span.set_attribute("ledgerbus.code", rejection.code)
        # A reason can quote the client (a field name, a subject token): redacted as the
        # audit record's is.
        span.set_status(Status(StatusCode.ERROR, f"{rejection.code}: {scrub(rejection.reason)}"))
    span.end()


def default_checks(
    max_message_bytes: int,
    policy: PolicyFile,
    max_checkpoint_bytes: int = 64 * 1024,
    installed: Callable[[], Collection[str]] = tuple,
    input_types: Callable[[], Mapping[str, Any]] = dict,
    tokens: ClaimTokens | None = None,
    agent_skills: Callable[[str, str], frozenset[str] | None] = lambda principal, skill: None,
    live_skills: Callable[[], Collection[str]] = tuple,
    agents_ttl_s: float = 30.0,
) -> list[Check]:
    """The pipeline in DESIGN.md's order: size, schema, kind, skill, claimant, plan, input,
    memory owner, duplicate id, rate, secrets, approval, budget, and last whether anyone
    serves the skill. ``installed`` lists the skills installed beside the router (a plan
    may name those, and any an agent advertised); ``input_types`` their declared input
    types; ``tokens`` checks that a claim presents its work item's token and
    ``agent_skills`` that its sender was given the skill (without them, every claim is
    refused); ``live_skills`` the skills the live agents offer (heartbeats younger than
    ``agents_ttl_s``).

    The subject is read first: it costs nothing, needs no body, and names the principal
    on every audit record, rejected ones included. Right after decoding, secrets are
    redacted from the event, so no record (whatever its verdict) keeps one in clear.
    Headers are checked after decoding so that their rejection still names its task.
    """
    from ledgerbus.router.checks import (
        approval,
        budget,
        duplicate,
        headers,
        inputs,
        lifecycle,
        memory,
        plan,
        principal,
        rate,
        schema,
        secrets,
        size,
        skills,
        unserved,
    )

    return [
        principal.check,
        size.make(max_message_bytes),
        schema.check,
        secrets.scan,
        headers.check,
        principal.check_kind_allowed,
        skills.make(policy),
        lifecycle.make(tokens or ClaimTokens(), agent_skills),
        plan.make(policy, installed),
        inputs.make(input_types),
        memory.make(max_checkpoint_bytes),
        duplicate.check,
        rate.make(policy),
        secrets.make(policy),
        approval.make(policy),
        budget.check,
        # Last: a sender refused for any other reason hears that reason, not this one.
        unserved.make(policy, installed, live_skills, agents_ttl_s),
    ]
