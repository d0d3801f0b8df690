"""The event schema: every message on the bus is one of these frozen msgspec Structs.

Messages sent to the router (the ingress union :data:`AnyEvent`) are tagged by ``kind``
and decoded strictly: unknown fields, wrong types and out-of-range values are errors
that name the offending path. Schemas only grow: a new field always has a default.

The log's own structs, which hold these events, are in :mod:`bus.records`; the
messages that are not events (a work item, a heartbeat, a notice) in :mod:`bus.messages`.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from ledgerbus.bus.subjects import ID_PATTERN, SKILL_PATTERN

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description="1-64 of A-Z a-z 0-9 _ -")]
Skill = Annotated[str, msgspec.Meta(pattern=SKILL_PATTERN)]
Attempt = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]
Text = Annotated[str, msgspec.Meta(max_length=16_384)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=256, description="1-256 characters")]
Label = Annotated[str, msgspec.Meta(max_length=128)]
StepId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]{1,32}$", description="1-32 of A-Z a-z 0-9 _")]
Capability = Annotated[
    str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="lowercase words with . _ -")
]
Priority = Annotated[int, msgspec.Meta(ge=0, le=10)]
Dispatch = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]

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
    gc=False,
    kw_only=True,
    tag_field="kind",
    forbid_unknown_fields=True,
):
    """Base of every ingress message. ``id`` is also the JetStream ``Nats-Msg-Id``."""

    id: Id


class Budget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The most a task may spend: tokens in and out together, and/or money. It covers the
    task's tree: the task itself and every subtask, plan and step under it."""

    tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    cost_usd: Annotated[float, msgspec.Meta(gt=0)] | None = None


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How often a failed task is run again, and how long the router waits in between.

    ``max_attempts`` counts runs that reported a failure (an agent dying mid-run is
    JetStream's redelivery, not a retry). The n-th retry waits
    ``min(backoff_s * backoff_factor ** (n - 1), max_backoff_s)``.
    """

    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    backoff_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 1.0
    backoff_factor: Annotated[float, msgspec.Meta(ge=1, le=10)] = 2.0
    max_backoff_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 300.0

    def delay_s(self, failures: int) -> float:
        """The wait before the run that follows the ``failures``-th failure."""
        return min(self.backoff_s * self.backoff_factor ** max(failures - 1, 0), self.max_backoff_s)


NO_RETRY = RetryPolicy()


CallHash = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$", description="a sha256, 64 hex digits")]


class Replay(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Answer the LLM calls of a task, and of every task under it, from a recording
    (``agents/llm/replay.py``; docs/replay.md): ``agentctl fork`` sets it on the tree it
    starts, and agents pass it on to the subtasks and plans their skills submit."""

    recording: CallHash
    """The recording (a list of recorded calls, stored in LLMCALLS under this hash)."""
    match: Literal["strict", "lenient"] = "lenient"
    """``strict``: a call is answered by a recorded call with the same request hash;
    ``lenient``: else by the recorded call with the same number in the task at the same
    place of its tree (for prompts that embed ids)."""
    live: bool = False
    """A call the recording has no answer for goes to the model (``--live``) instead of
    failing."""


class Kept(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A plan step a fork does not run again: it completed, with ``output``, as task
    ``source_task_id`` of the run the fork comes from."""

    source_task_id: Id
    output: Any = None


class TaskSubmitted(Event, tag="task_submitted", frozen=True):
    """A principal asks for ``skill`` to be run on ``input``."""

    task_id: Id
    skill: Skill
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout_s: Seconds = DEFAULT_TASK_TIMEOUT_S
    budget: Budget | None = None
    parent_task_id: Id | None = None
    """Set when an agent's skill dispatches this task while running ``parent_task_id``."""
    retry: RetryPolicy | None = None
    handoff: bool = False
    """The parent handed its work over to this task (``ctx.handoff``) rather than delegating
    a part of it (``ctx.delegate``)."""
    replay: Replay | None = None
    """Its LLM calls (and its subtasks') are answered from a recording (a fork's, or a re-run's)."""
    kept: Kept | None = None
    """A subtask a forked skill submits again that had completed in the source run: it is
    not run, and counts as completed with the source's output (only with ``replay``)."""


class PlanStep(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One subtask of a plan: what to run, after what, how urgently, and what if it fails.

    Name either ``skill`` or the ``capabilities`` it needs (the router then picks the live
    skill that fits best). ``on_failure``: ``fail`` fails the whole plan once the step's
    retries are spent; ``continue`` marks it failed, skips the steps that depend on it,
    and lets the rest of the plan run.
    """

    id: StepId
    skill: Skill | None = None
    capabilities: Annotated[list[Capability], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=list)
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    deps: Annotated[list[StepId], msgspec.Meta(max_length=256)] = msgspec.field(default_factory=list)
    priority: Priority = 5
    timeout_s: Seconds = DEFAULT_TASK_TIMEOUT_S
    retry: RetryPolicy = NO_RETRY
    on_failure: Literal["fail", "continue"] = "fail"
    role: Annotated[str, msgspec.Meta(pattern=r"^([a-z0-9][a-z0-9_-]{0,47})?$")] = ""
    """The agent profile the step plays (a pipeline's role): the agent of that name serves
    it when it is live and offers the step's skill, else the best fit, which plays the role
    from the step's input (its instructions and model route)."""


class PlanSubmitted(Event, tag="plan_submitted", frozen=True):
    """A graph of subtasks, run as task ``task_id``: each step becomes the subtask
    ``<task_id>-<step id>``, dispatched once every step it depends on has completed."""

    task_id: Id
    steps: Annotated[list[PlanStep], msgspec.Meta(min_length=1, max_length=1000)]
    name: Label = ""
    parent_task_id: Id | None = None
    """The task whose skill submitted this plan (the ``plan`` skill does), if any: the plan
    is its subtask, bounded by ``[delegation]`` and cancelled with it."""
    budget: Budget | None = None
    """The most the plan may spend, every step and everything under them together."""
    replay: Replay | None = None
    """Its steps' LLM calls (and their subtasks') are answered from a recording."""
    kept: dict[StepId, Kept] = msgspec.field(default_factory=dict)
    """Steps that completed in the run this plan is a fork of: they are not run again, and
    count as completed with their output (only with ``replay``: a fork's plan)."""


PLAN_SKILL = "plan"
"""The ``skill`` recorded for a plan's own task (the router runs it; no agent does)."""


def step_task_id(plan_id: str, step_id: str) -> str:
    """The task id of a plan step: ``<plan task id>-<step id>`` (step ids have no ``-``,
    so the split at the last ``-`` is unambiguous)."""
    return f"{plan_id}-{step_id}"


class TaskCancelled(Event, tag="task_cancelled", frozen=True):
    """Stop a task and everything under it: what has not run never will, and a running
    skill is told to stop (its result would not count)."""

    task_id: Id
    reason: Text = ""
    skipped: bool = False
    """Router only: a plan step not run because a step it depends on failed (and that
    step's failure policy let the plan go on)."""


class TaskStarted(Event, tag="task_started", frozen=True):
    """An agent claims a task: ``attempt`` counts every claim of the task so far (the
    dispatch's ``attempt_base`` plus its JetStream delivery count); ``dispatch`` is the
    dispatch the claim answers, so a stale redelivery of an earlier one is refused."""

    task_id: Id
    attempt: Attempt
    dispatch: Dispatch = 1
    token: Annotated[str, msgspec.Meta(max_length=96)] = ""
    """The claim token the work item carried: proof that the claimant received this
    dispatch (router/claims.py). Its audit record keeps only its fingerprint."""


class TaskProgress(Event, tag="task_progress", frozen=True):
    """The claimant reports progress while it works."""

    task_id: Id
    attempt: Attempt
    message: Text = ""
    fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class Claim(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A claim carried by a result (``TaskCompleted.claim``, ``TaskFailed.claim``): what a
    ``TaskStarted`` would have said, for a task that finished before its agent sent one
    (docs/architecture.md, "Claim and result together"). The result's ``attempt`` is the
    claim's attempt."""

    dispatch: Dispatch = 1
    token: Annotated[str, msgspec.Meta(max_length=96)] = ""
    """As ``TaskStarted.token``; the audit record keeps only its fingerprint."""


class TaskCompleted(Event, tag="task_completed", frozen=True):
    """The claimant finished the task with ``output``; with ``claim``, the sender claims
    the task and completes it in one message (the router checks both)."""

    task_id: Id
    attempt: Attempt
    output: Any = None
    claim: Claim | None = None


class TaskFailed(Event, tag="task_failed", frozen=True):
    """The claimant gave up on the task; ``error`` says why. ``claim`` as for
    :class:`TaskCompleted`."""

    task_id: Id
    attempt: Attempt
    error: Text
    claim: Claim | None = None


class TaskUsage(Event, tag="task_usage", frozen=True):
    """The claimant spent tokens (and money) on the task, e.g. one LLM call."""

    task_id: Id
    attempt: Attempt
    tokens_in: Annotated[int, msgspec.Meta(ge=0)] = 0
    tokens_out: Annotated[int, msgspec.Meta(ge=0)] = 0
    cost_usd: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    provider: Annotated[str, msgspec.Meta(max_length=64)] = ""
    model: Annotated[str, msgspec.Meta(max_length=128)] = ""
    latency_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """How long the call took (failed calls are reported too, with no tokens)."""
    outcome: Annotated[str, msgspec.Meta(max_length=32)] = "ok"
    """``ok``, or what ended the call: ``rate_limited``, ``timeout``, ``server``, ``malformed``, ``refused``...;
    ``replayed``: answered from a recording (``call`` names it; no tokens were spent)."""
    call: Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?$")] = ""
    """The recorded call (request and answer, in LLMCALLS under this sha256): ``agentctl llm show``."""


class TaskApproved(Event, tag="task_approved", frozen=True):
    """An approver lets a task held for approval run."""

    task_id: Id
    reason: Text = ""


class TaskDenied(Event, tag="task_denied", frozen=True):
    """An approver refuses a task held for approval; it never runs."""

    task_id: Id
    reason: Text = ""


class AgentJoined(Event, tag="agent_joined", frozen=True):
    """An agent process came up and advertises its skills, and what each can do."""

    instance: Id
    skills: Annotated[list[Skill], msgspec.Meta(min_length=1, max_length=256)]
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    capabilities: dict[Skill, Annotated[list[Capability], msgspec.Meta(max_length=64)]] = msgspec.field(
        default_factory=dict
    )
    """skill → the free-form capabilities it provides (its own and the agent profile's)"""
    profile: Label = ""


class AgentLeft(Event, tag="agent_left", frozen=True):
    """An agent instance left: it drained and stopped (sent by the agent, ``reason
    "drained"``), or the router saw its heartbeat lapse (sent by the router, ``reason
    "heartbeat_expired"``, naming the ``agent``). ``remaining``: the instances of the
    agent still live, as the router saw them (``-1``: not counted, the agent's own record)."""

    instance: Id
    reason: Text = ""
    agent: Annotated[str, msgspec.Meta(pattern=r"^([a-z0-9][a-z0-9_-]{0,47})?$")] = ""
    """The agent that left, when the router records it; empty: the sender."""
    remaining: Annotated[int, msgspec.Meta(ge=-1)] = -1


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


class MemoryImage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent's memory as a checkpoint holds it, given whole (a fork's: the memory as it
    was at the fork point, read from the log)."""

    role: Any = None
    knowledge: dict[Key, dict[str, Any]] = msgspec.field(default_factory=dict)
    """key → ``{"value": ..., "core": bool}``"""
    observation: list[Any] = msgspec.field(default_factory=list)
    reasoning: list[Any] = msgspec.field(default_factory=list)


class CheckpointSaved(Event, tag="checkpoint_saved", frozen=True):
    """Name the agent's memory as it is at this point of the log, to restore later.

    ``state`` is an optional, bounded blob of the agent's own (opaque to the bus). With
    ``memory`` (operators only) the checkpoint holds that memory instead of the agent's
    current one: ``agentctl fork`` saves the memory as it was at the fork point this way.
    """

    agent: Id
    checkpoint_id: Id
    label: Label = ""
    state: Any = None
    memory: MemoryImage | None = None


class CheckpointRestored(Event, tag="checkpoint_restored", frozen=True):
    """Make the agent's memory what it was when ``checkpoint_id`` was saved."""

    agent: Id
    checkpoint_id: Id


class RunForked(Event, tag="run_forked", frozen=True):
    """An operator starts a new run of task ``source_task_id``'s tree as it stood at log
    position ``at_seq`` (``agentctl fork``): the new root is ``task_id``, submitted next;
    the steps finished by ``at_seq`` keep their outputs, the others run again, their LLM
    calls answered from ``recording`` (``live``: those it has no answer for go to the model).
    The original run is not touched."""

    task_id: Id
    source_task_id: Id
    at_seq: Annotated[int, msgspec.Meta(ge=1)]
    recording: CallHash
    live: bool = False
    kept: Annotated[list[Id], msgspec.Meta(max_length=1000)] = msgspec.field(default_factory=list)
    """The source tree's tasks whose outputs the fork keeps."""
    restored: Annotated[list[Id], msgspec.Meta(max_length=256)] = msgspec.field(default_factory=list)
    """The agents whose memory the fork restored to ``at_seq`` (a checkpoint each)."""


class SharedWritten(Event, tag="shared_written", frozen=True):
    """Set (or, with ``value`` null, delete) a key of the shared context between agents.

    With ``ttl_s`` the key expires that long after the router recorded the write.
    """

    namespace: Id
    key: Key
    value: Any = None
    ttl_s: Seconds | None = None


# The router's own decisions. No principal may send these: the router appends them to the
# log (principal ``router``) before acting on them, so a restarted router knows what it did.


class TaskDispatched(Event, tag="task_dispatched", frozen=True):
    """The router put the task in WORK: a plan step whose dependencies are done, a
    submission held for a match (``awaiting_match``) once a live agent provides it, a
    retry, or work handed on from an agent whose every instance left (``reassigned``).
    The first dispatch of a plain submission is the submission itself.

    With ``agent`` set the work was assigned to that agent (all its live instances, a
    pool) on ``assign.<agent>.<skill>``, which only it may pull; empty, it went to the
    skill's shared queue ``work.<skill>``. See docs/orchestration.md, "Where work goes"."""

    task_id: Id
    skill: Skill
    dispatch: Dispatch
    attempt_base: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Claims of the task before this dispatch: its claims count on from here."""
    reason: Literal["ready", "retry", "matched", "reassigned"] = "ready"
    score: float | None = None
    """How well the chosen agent's skill fits what the task needs: ``|needed| /
    |provided|`` (1 is exact; see :func:`router.scheduler.match`)."""
    agent: Annotated[str, msgspec.Meta(pattern=r"^([a-z0-9][a-z0-9_-]{0,47})?$")] = ""
    """The agent (pool of its live instances) the work is assigned to; empty: any agent
    with the skill."""


class Handoff(Event, tag="handoff", frozen=True):
    """Work passed from one role to the next: task ``task_id`` takes over from
    ``from_task``. The router records it before it dispatches a pipeline step that plays a
    role after another role's step, and after it accepts a subtask a skill handed its work
    to (``ctx.handoff``: ``task_submitted`` with ``handoff``)."""

    task_id: Id
    from_task: Id
    from_role: Label = ""
    """The role (or agent) handing over."""
    to_role: Label = ""


class TaskRetryScheduled(Event, tag="task_retry_scheduled", frozen=True):
    """The task failed with retries left: it is dispatched again at ``not_before``."""

    task_id: Id
    failures: Annotated[int, msgspec.Meta(ge=1)]
    not_before: datetime


class TaskDeadLettered(Event, tag="task_dead_lettered", frozen=True):
    """The router gave up on the task: its retries are spent. Terminal."""

    task_id: Id
    failures: Annotated[int, msgspec.Meta(ge=0)]
    reason: Text


class AgentProposal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent configuration the router suggests when no live agent can serve a step."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
    skills: Annotated[list[Skill], msgspec.Meta(max_length=256)]
    capabilities: Annotated[list[Capability], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    prompt: Text = ""


class SkillUnmatched(Event, tag="skill_unmatched", frozen=True):
    """No live agent offers a skill with every capability the step needs (for a submission
    held for a match, its skill's name). It waits; ``proposal`` (approved with
    ``agentctl agents propose --approve``) would serve it."""

    task_id: Id
    capabilities: list[Capability]
    proposal: AgentProposal


class ProposalApproved(Event, tag="proposal_approved", frozen=True):
    """An operator turned a proposal (the id of its ``skill_unmatched`` event) into an
    agent profile named ``profile``: saved in the profiles file (``saved``), or for this run
    only (kept under ``var/proposals``, not in the project's profiles)."""

    proposal_id: Id
    profile: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
    saved: bool = True


AnyEvent = (
    TaskSubmitted | PlanSubmitted | TaskCancelled | TaskStarted | TaskProgress | TaskCompleted | TaskFailed
    | TaskUsage | TaskApproved | TaskDenied
    | TaskDispatched | TaskRetryScheduled | TaskDeadLettered | SkillUnmatched | Handoff | ProposalApproved
    | AgentJoined | AgentLeft
    | MemoryWritten | MemoryWiped | CheckpointSaved | CheckpointRestored | SharedWritten | RunForked
)
"""Every event the log may hold: what principals send, and the router's own decisions."""

TASK_EVENTS = (
    TaskSubmitted, PlanSubmitted, TaskCancelled, TaskStarted, TaskProgress, TaskCompleted, TaskFailed, TaskUsage,
    TaskApproved, TaskDenied, TaskDispatched, TaskRetryScheduled, TaskDeadLettered, SkillUnmatched, Handoff,
)
"""Events about one task: their ``task_id`` is the audit key."""
ROUTER_EVENTS = (TaskDispatched, TaskRetryScheduled, TaskDeadLettered, SkillUnmatched, Handoff)
"""Events only the router writes (and ``agent_left`` naming an ``agent``: a lapsed heartbeat)."""
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
    for t in (*TASK_EVENTS, *AGENT_EVENTS, *MEMORY_EVENTS, SharedWritten, ProposalApproved, RunForked)
}
