"""Reading the audit log from the CLI: one task's records, or a range of the whole log."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from ledgerbus.bus import codec, lifecycle, subjects
from ledgerbus.bus.events import (
    Claim,
    Kept,
    SkillUnmatched,
    TaskApproved,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDenied,
    TaskDispatched,
    TaskFailed,
    TaskProgress,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskUsage,
)
from ledgerbus.bus.lifecycle import AWAITING_MATCH, BUDGET_EXCEEDED, NO_AGENT, Shape, Status
from ledgerbus.bus.records import AuditRecord


async def records(
    js: JetStreamContext,
    filter_subject: str = subjects.AUDIT_ALL,
    from_seq: int = 1,
    follow: bool = False,
    idle: float = 1.0,
) -> AsyncGenerator[tuple[AuditRecord, bytes], None]:
    """Audit records (decoded, and the stored bytes) from ``from_seq`` matching the filter.

    Without ``follow`` it stops at the end of the log as it was when it started. A record
    this version cannot decode ends it with :class:`bus.errors.UnreadableRecord`.
    """
    # Closed here, not left to the event loop's finalizer: that would unsubscribe after the
    # connection began draining, and print a traceback on the way out of the command.
    async with contextlib.aclosing(messages(js, subjects.AUDIT_STREAM, filter_subject, from_seq, follow, idle)) as msgs:
        async for msg in msgs:
            yield codec.read_record(msg.metadata.sequence.stream, msg.data), msg.data


async def messages(
    js: JetStreamContext,
    stream: str,
    filter_subject: str,
    from_seq: int = 1,
    follow: bool = False,
    idle: float = 1.0,
) -> AsyncGenerator[Msg, None]:
    """The messages of ``stream`` from ``from_seq`` matching the filter, through an ordered
    consumer. Without ``follow`` it stops at the end of the stream as it was when it started.
    """
    sub = await js.subscribe(
        filter_subject,
        stream=stream,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, from_seq)),
    )
    try:
        if not follow:
            # num_pending counts only what the server has not pushed yet: the stream is
            # empty for this filter only if nothing is pending and nothing was delivered.
            info = await sub.consumer_info()
            if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                return
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except TimeoutError:
                if follow:
                    continue
                return
            yield msg
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            await sub.unsubscribe()  # a closing connection takes its subscriptions with it


@dataclass
class TaskView:
    """One task as its audit records tell it, folded live by ``submit --wait``."""

    task_id: str
    msg_id: str
    """The id of the submission being followed: records before its verdict are ignored,
    so reusing a task id shows this submission's fate, not an older one's."""
    skill: str = ""
    status: Status = Status.SUBMITTED
    agent: str = ""
    attempts: int = 0
    progress: str = ""
    fraction: float | None = None
    output: Any = None
    error: str = ""
    code: str = ""
    reason: str = ""
    submitted_seq: int = 0
    finished_seq: int = 0
    seconds: float | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    notes: list[str] = field(default_factory=list)
    max_attempts: int = 1
    failures: int = 0
    warnings: list[str] = field(default_factory=list)
    """What the submitter should know at once while it waits: that nobody serves the
    skill, that an agent was proposed for it (``submit --wait`` prints each as it comes)."""
    unserved: bool = False
    """No agent served the skill when it was submitted (and none has claimed it since)."""
    proposal_id: str = ""
    _submitted_at: Any = None
    _seen_verdict: bool = False

    @property
    def terminal(self) -> bool:
        """Whether nothing more will happen to the task (a failure with attempts left is
        followed by a retry or a dead letter)."""
        return lifecycle.settled(self.status, self.max_attempts > 1)

    def apply(self, record: AuditRecord) -> None:
        """Fold one of the task's audit records into the view."""
        event = record.event
        if not self._seen_verdict:
            if record.msg_id != self.msg_id:
                return
            self._seen_verdict = True
        if not record.accepted:
            if record.msg_id == self.msg_id:
                self.status, self.code, self.reason = lifecycle.created(record, Shape.TASK), record.code, record.reason
                self.finished_seq = record.seq
            else:
                self.notes.append(f"seq {record.seq}: {record.principal} {record.kind} rejected: {record.reason}")
            return
        agent = record.principal.removeprefix("agent-")
        match event:
            case TaskSubmitted(skill=skill, retry=retry):
                self.skill, self.submitted_seq = skill, record.seq
                self.max_attempts = retry.max_attempts if retry is not None else 1
                self.status = lifecycle.created(record, Shape.TASK)
                self._submitted_at = record.at
                if record.code != "ok":
                    # Accepted with a word for the submitter: nobody serves the skill
                    # (no_agent, awaiting_match), or it waits for an approver.
                    self.code, self.reason = record.code, record.reason
                    self.unserved = record.code in (NO_AGENT, AWAITING_MATCH)
                    self.warnings.append(record.reason)
            case SkillUnmatched(id=proposal_id, proposal=proposal):
                self.proposal_id = proposal_id
                self.warnings.append(
                    f"proposal {proposal_id}: an agent {proposal.name} with skills {', '.join(proposal.skills)} "
                    f"would serve it; approve it with `agentctl agents propose --approve {proposal_id}`, then "
                    f"start it with `agentctl agent --profile {proposal.name}`")
            case TaskApproved():
                self.notes.append(f"approved by {record.principal}")
            case TaskUsage(tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost):
                self.tokens += tokens_in + tokens_out
                self.cost_usd += cost
                if record.code == BUDGET_EXCEEDED:
                    self._finish(record)
                    self.max_attempts = 1  # a spent budget is never retried
                    self.error = f"budget exceeded: {record.reason}"
            case TaskDenied(reason=reason):
                self._finish(record)
                self.error = f"denied by {record.principal}" + (f": {reason}" if reason else "")
            case TaskStarted() | TaskCompleted(claim=Claim()) | TaskFailed(claim=Claim()):
                self._claimed(agent, record.event)
        match record.event:
            case TaskProgress(message=message, fraction=fraction):
                self.progress, self.fraction = message, fraction
            case TaskCompleted(output=output):
                self._finish(record)
                self.output = output
            case TaskSubmitted(kept=Kept(output=output, source_task_id=source)):  # a fork's: done already
                self._finish(record)
                self.output = output
                self.notes.append(f"kept from {source}")
            case TaskFailed(error=error):
                self._finish(record)
                self.error = error
                self.failures += 1
            case TaskRetryScheduled(not_before=at):
                self.notes.append(f"failed ({self.error}); retry {self.failures} at {at:%H:%M:%S}")
            case TaskDispatched(reason="matched", skill=skill):
                self.notes.append(f"matched to the live skill {skill}")
            case TaskDispatched(reason=reason):
                self.notes.append(f"dispatched again ({reason})")
            case TaskDeadLettered(reason=reason):
                self._finish(record)
                self.error = reason
            case TaskCancelled(reason=reason):
                self._finish(record)
                self.error = reason or f"cancelled by {record.principal}"
            case _:
                pass
        if not isinstance(event, TaskSubmitted):
            self.status = lifecycle.after(self.status, record, Shape.TASK)

    def _claimed(self, agent: str, event: Any) -> None:
        """A claim: a ``task_started``, or a result that carries its claim."""
        claim = lifecycle.claim_of(event)
        assert claim is not None
        self.agent, self.attempts = agent, self.attempts + 1
        self.unserved = False
        self.progress, self.fraction = "", None
        if claim.attempt > claim.dispatch:
            self.notes.append(f"attempt {claim.attempt} on {agent} (the previous claim lapsed)")

    def _finish(self, record: AuditRecord) -> None:
        self.finished_seq = record.seq
        if self._submitted_at is not None:
            self.seconds = round((record.at - self._submitted_at).total_seconds(), 3)

    def as_json(self) -> dict[str, Any]:
        """The view as a JSON-able dict (``--json``)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
