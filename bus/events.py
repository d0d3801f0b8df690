"""The event schema: every message on the bus is one of these frozen msgspec Structs.

Messages sent to the router (the ingress union :data:`AnyEvent`) are tagged by ``kind``
and decoded strictly: unknown fields, wrong types and out-of-range values are errors
that name the offending path. Schemas only grow: a new field always has a default.

The router's own output is :class:`AuditRecord` (one per ingress message, hash-chained)
and :class:`WorkItem` (a task dispatched to ``work.<skill>``).
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from bus.subjects import ID_PATTERN, SKILL_PATTERN

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description="1-64 of A-Z a-z 0-9 _ -")]
Skill = Annotated[str, msgspec.Meta(pattern=SKILL_PATTERN)]
Attempt = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]
Text = Annotated[str, msgspec.Meta(max_length=16_384)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=256, description="1-256 characters")]
Label = Annotated[str, msgspec.Meta(max_length=128)]

DEFAULT_TASK_TIMEOUT_S = 300.0


def new_id() -> str:
    """A fresh random message or task id (128 bits, URL-safe).

    Never starting with ``-``: people pass ids to ``agentctl`` as arguments, where a
    leading dash reads as an option (one id in 64 did).
    """
    while (fresh := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return fresh


class Event(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    tag_field="kind",
    forbid_unknown_fields=True,
):
    """Base of every ingress message. ``id`` is also the JetStream ``Nats-Msg-Id``."""

    id: Id


class Budget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The most a task may spend: tokens in and out together, and/or money."""

    tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    cost_usd: Annotated[float, msgspec.Meta(gt=0)] | None = None


class TaskSubmitted(Event, tag="task_submitted", frozen=True):
    """A principal asks for ``skill`` to be run on ``input``."""

    task_id: Id
    skill: Skill
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout_s: Seconds = DEFAULT_TASK_TIMEOUT_S
    budget: Budget | None = None
    parent_task_id: Id | None = None
    """Set when an agent's skill dispatches this task while running ``parent_task_id``."""


class TaskStarted(Event, tag="task_started", frozen=True):
    """An agent claims a task: ``attempt`` is its JetStream delivery count."""

    task_id: Id
    attempt: Attempt


class TaskProgress(Event, tag="task_progress", frozen=True):
    """The claimant reports progress while it works."""

    task_id: Id
    attempt: Attempt
    message: Text = ""
    fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class TaskCompleted(Event, tag="task_completed", frozen=True):
    """The claimant finished the task with ``output``."""

    task_id: Id
    attempt: Attempt
    output: Any = None


class TaskFailed(Event, tag="task_failed", frozen=True):
    """The claimant gave up on the task; ``error`` says why."""

    task_id: Id
    attempt: Attempt
    error: Text


class TaskUsage(Event, tag="task_usage", frozen=True):
    """The claimant spent tokens (and money) on the task, e.g. one LLM call."""

    task_id: Id
    attempt: Attempt
    tokens_in: Annotated[int, msgspec.Meta(ge=0)] = 0
    tokens_out: Annotated[int, msgspec.Meta(ge=0)] = 0
    cost_usd: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    provider: Annotated[str, msgspec.Meta(max_length=64)] = ""
    model: Annotated[str, msgspec.Meta(max_length=128)] = ""


class TaskApproved(Event, tag="task_approved", frozen=True):
    """An approver lets a task held for approval run."""

    task_id: Id
    reason: Text = ""


class TaskDenied(Event, tag="task_denied", frozen=True):
    """An approver refuses a task held for approval; it never runs."""

    task_id: Id
    reason: Text = ""


class AgentJoined(Event, tag="agent_joined", frozen=True):
    """An agent process came up and advertises its skills."""

    instance: Id
    skills: Annotated[list[Skill], msgspec.Meta(min_length=1, max_length=256)]
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1


class AgentLeft(Event, tag="agent_left", frozen=True):
    """An agent process drained and stopped."""

    instance: Id
    reason: Text = ""


MemorySection = Literal["role", "knowledge", "observation", "reasoning"]
"""The parts of an agent's memory: ``role`` (one value), ``knowledge`` (key → value), and
the append-only ``observation`` and ``reasoning`` lists. The current task is not written:
it follows from the agent's own ``TaskStarted`` and results."""


class MemoryWritten(Event, tag="memory_written", frozen=True):
    """A write to one agent's memory, by the agent itself or by an operator.

    ``knowledge`` needs ``key``; ``value`` null forgets the key. ``core`` knowledge
    survives a wipe. ``observation`` and ``reasoning`` append ``value`` to their list;
    ``role`` sets (or, with null, clears) the agent's role.
    """

    agent: Id
    section: MemorySection
    key: Key | None = None
    value: Any = None
    core: bool = False


class MemoryWiped(Event, tag="memory_wiped", frozen=True):
    """Clear an agent's current task, observations, reasoning and non-core knowledge;
    its role and core knowledge stay."""

    agent: Id
    reason: Text = ""


class CheckpointSaved(Event, tag="checkpoint_saved", frozen=True):
    """Name the agent's memory as it is at this point of the log, to restore later.

    ``state`` is an optional, bounded blob of the agent's own (opaque to the bus).
    """

    agent: Id
    checkpoint_id: Id
    label: Label = ""
    state: Any = None


class CheckpointRestored(Event, tag="checkpoint_restored", frozen=True):
    """Make the agent's memory what it was when ``checkpoint_id`` was saved."""

    agent: Id
    checkpoint_id: Id


class SharedWritten(Event, tag="shared_written", frozen=True):
    """Set (or, with ``value`` null, delete) a key of the shared context between agents.

    With ``ttl_s`` the key expires that long after the router recorded the write.
    """

    namespace: Id
    key: Key
    value: Any = None
    ttl_s: Seconds | None = None


AnyEvent = (
    TaskSubmitted | TaskStarted | TaskProgress | TaskCompleted | TaskFailed | TaskUsage | TaskApproved | TaskDenied
    | AgentJoined | AgentLeft
    | MemoryWritten | MemoryWiped | CheckpointSaved | CheckpointRestored | SharedWritten
)
"""The ingress union: every message a principal may send to the router."""

TASK_EVENTS = (
    TaskSubmitted, TaskStarted, TaskProgress, TaskCompleted, TaskFailed, TaskUsage, TaskApproved, TaskDenied
)
AGENT_EVENTS = (AgentJoined, AgentLeft)
MEMORY_EVENTS = (MemoryWritten, MemoryWiped, CheckpointSaved, CheckpointRestored)
"""Events about one agent's memory: their ``agent`` field is the audit key."""


def kind_of(event_type: type[Event]) -> str:
    """The ``kind`` tag of an event type, e.g. ``task_submitted``."""
    tag = event_type.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


EVENT_KINDS: dict[str, type[Event]] = {
    kind_of(t): t
    for t in (*TASK_EVENTS, *AGENT_EVENTS, *MEMORY_EVENTS, SharedWritten)
}

Verdict = Literal["accepted", "rejected"]


class RawExcerpt(msgspec.Struct, frozen=True, kw_only=True):
    """What the audit log keeps of a message that could not be decoded."""

    size: int
    sha256: str
    head: str
    """The first bytes, decoded as UTF-8 with replacement, so a person can see what came."""


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """The router's signed statement: the chain up to ``covers_seq`` has head ``chain_head``.

    Written into the log itself every so many records, as CloudTrail digests and RFC 6962
    signed tree heads are; ``signature`` is Ed25519 over this struct's JSON with
    ``signature=""``, by the key whose sha256 prefix is ``key_id``.
    """

    covers_seq: int
    chain_head: str
    prev_checkpoint_seq: int
    key_id: str
    at: datetime | None = None
    signature: str = ""


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the audit log: the router's verdict on one ingress message.

    ``hash = sha256(prev_hash || canonical bytes of this record with hash="")``; see
    :mod:`bus.chain`. ``seq`` is the AUDIT stream sequence the record was appended at.
    """

    seq: int
    at: datetime
    verdict: Verdict
    code: str
    reason: str
    principal: str
    kind: str
    key: str
    msg_id: str
    ingress_seq: int
    delivery: int
    trace_id: str = ""
    event: AnyEvent | None = None
    raw: RawExcerpt | None = None
    checkpoint: Checkpoint | None = None
    prev_hash: str = ""
    hash: str = ""

    @property
    def accepted(self) -> bool:
        """Whether the router accepted the message."""
        return self.verdict == "accepted"


class WorkItem(msgspec.Struct, frozen=True, kw_only=True):
    """A task dispatched to ``work.<skill>``, pulled by an agent that has the skill."""

    task_id: str
    skill: str
    input: dict[str, Any]
    timeout_s: float
    audit_seq: int
    submitted_by: str
