"""The event schema: every union member round-trips; bad input is rejected with its path."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

import msgspec
import pytest

from ledgerbus.bus import chain, codec, subjects
from ledgerbus.bus.errors import ChainError, SchemaError
from ledgerbus.bus.events import (
    AgentJoined,
    AgentLeft,
    AgentProposal,
    AnyEvent,
    Budget,
    CheckpointRestored,
    CheckpointSaved,
    Event,
    Handoff,
    MemoryWiped,
    MemoryWritten,
    PlanStep,
    PlanSubmitted,
    ProposalApproved,
    RetryPolicy,
    RunForked,
    SharedWritten,
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
    new_id,
)
from ledgerbus.bus.messages import WorkItem
from ledgerbus.bus.records import AuditRecord, RawExcerpt

EXAMPLES: dict[type[Event], Event] = {
    TaskSubmitted: TaskSubmitted(id="m1", task_id="t1", skill="llm.chat", input={"a": [1, 2.5, None, "x"]}, timeout_s=3,
                                 budget=Budget(tokens=1000, cost_usd=0.5)),
    TaskStarted: TaskStarted(id="m2", task_id="t1", attempt=2),
    TaskProgress: TaskProgress(id="m3", task_id="t1", attempt=2, message="half", fraction=0.5),
    TaskCompleted: TaskCompleted(id="m4", task_id="t1", attempt=2, output={"nested": {"ok": True}}),
    TaskFailed: TaskFailed(id="m5", task_id="t1", attempt=2, error="boom"),
    TaskUsage: TaskUsage(id="m10", task_id="t1", attempt=2, tokens_in=120, tokens_out=30, cost_usd=0.002,
                         provider="anthropic", model="claude"),
    TaskApproved: TaskApproved(id="m8", task_id="t1", reason="looks fine"),
    TaskDenied: TaskDenied(id="m9", task_id="t1"),
    AgentJoined: AgentJoined(id="m6", instance="echo-1-abcd", skills=["echo", "sleep"], concurrency=4),
    AgentLeft: AgentLeft(id="m7", instance="echo-1-abcd", reason="drained"),
    MemoryWritten: MemoryWritten(id="m11", agent="echo-1", section="knowledge", key="user.name", value={"n": "Ada"},
                                 core=True),
    MemoryWiped: MemoryWiped(id="m12", agent="echo-1", reason="new project"),
    CheckpointSaved: CheckpointSaved(id="m13", agent="echo-1", checkpoint_id="before-refactor", label="v1",
                                     state={"step": 3}),
    CheckpointRestored: CheckpointRestored(id="m14", agent="echo-1", checkpoint_id="before-refactor"),
    SharedWritten: SharedWritten(id="m15", namespace="team", key="plan", value=["a", "b"], ttl_s=60),
    PlanSubmitted: PlanSubmitted(id="m16", task_id="p1", name="build", steps=[
        PlanStep(id="setup", skill="sleep", input={"seconds": 1}, priority=7,
                 retry=RetryPolicy(max_attempts=3, backoff_s=0.5)),
        PlanStep(id="test", capabilities=["python", "testing"], deps=["setup"], on_failure="continue"),
    ]),
    TaskCancelled: TaskCancelled(id="m17", task_id="p1", reason="wrong branch"),
    TaskDispatched: TaskDispatched(id="m18", task_id="p1-test", skill="pytest", dispatch=2, attempt_base=1,
                                   reason="matched", score=0.5),
    TaskRetryScheduled: TaskRetryScheduled(id="m19", task_id="p1-setup", failures=1,
                                           not_before=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    TaskDeadLettered: TaskDeadLettered(id="m20", task_id="p1-setup", failures=3, reason="failed 3 of 3 attempts"),
    SkillUnmatched: SkillUnmatched(id="m21", task_id="p1-test", capabilities=["python"], proposal=AgentProposal(
        name="python-agent", skills=["llm.chat"], capabilities=["python"], prompt="You write Python.")),
    ProposalApproved: ProposalApproved(id="m22", proposal_id="m21", profile="python-agent"),
    Handoff: Handoff(id="m23", task_id="sop-architect", from_task="sop-product_manager", from_role="product-manager",
                     to_role="architect"),
    RunForked: RunForked(id="m24", task_id="sop2", source_task_id="sop", at_seq=42, recording="ab" * 32,
                         kept=["sop-product_manager"], restored=["architect"]),
}


def test_every_union_member_has_an_example() -> None:
    assert set(typing.get_args(AnyEvent)) == set(EXAMPLES)


@pytest.mark.parametrize("event", EXAMPLES.values(), ids=lambda e: type(e).__name__)
def test_every_union_member_round_trips(event: Event) -> None:
    data = codec.encode(event)
    assert codec.decode_event(data) == event
    decoded_once = codec.encode(codec.decode_event(data))
    assert codec.encode(codec.decode_event(decoded_once)) == decoded_once


def test_audit_record_and_work_item_round_trip() -> None:
    record = AuditRecord(
        seq=7, at=datetime(2026, 1, 2, 3, 4, 5, 6789, tzinfo=UTC), verdict="rejected", code="schema",
        reason="bad", principal="cli-alice", kind="unknown", key="_", msg_id="", ingress_seq=9, delivery=1,
        raw=RawExcerpt(size=3, sha256="00" * 32, head="{x"), prev_hash=chain.GENESIS, hash="ab" * 32,
    )
    assert codec.decode_record(codec.encode(record)) == record
    item = WorkItem(task_id="t", skill="echo", input={}, timeout_s=1.0, audit_seq=1, submitted_by="cli-a")
    assert codec.decode_work(codec.encode(item)) == item


@pytest.mark.parametrize(
    ("data", "path_or_words"),
    [
        (b'{"kind":"task_exploded","id":"m"}', "task_exploded"),
        (b'{"kind":"task_started","id":"m","task_id":"t","attempt":"1"}', "$.attempt"),
        (b'{"kind":"task_started","id":"m","task_id":"t","attempt":0}', "$.attempt"),
        (b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","sender":"cli-bob"}', "sender"),
        (b'{"kind":"task_submitted","id":"m","task_id":"t.x","skill":"echo"}', "$.task_id"),
        (b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"Echo Skill"}', "$.skill"),
        (b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","input":[]}', "$.input"),
        (b'{"id":"m","task_id":"t"}', "kind"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "ends too soon"),
    ],
)
def test_bad_messages_are_rejected_naming_what_is_wrong(data: bytes, path_or_words: str) -> None:
    with pytest.raises(SchemaError) as info:
        codec.decode_event(data)
    assert path_or_words.lower() in str(info.value).lower()


def _records(n: int) -> list[tuple[int, bytes]]:
    head, out = chain.ChainHead(), []
    for i in range(1, n + 1):
        rec = AuditRecord(seq=i, at=datetime(2026, 1, 1, tzinfo=UTC), verdict="accepted", code="ok", reason="",
                          principal="cli-a", kind="task_submitted", key=f"t{i}", msg_id=f"m{i}", ingress_seq=i,
                          delivery=1, event=TaskSubmitted(id=f"m{i}", task_id=f"t{i}", skill="echo"))
        sealed, data = chain.seal(rec, head.hash)
        head = chain.ChainHead(i, sealed.hash)
        out.append((i, data))
    return out


def test_a_record_built_with_python_values_still_verifies() -> None:
    # timeout_s=3 is an int in a float field: encoded as 3, decoded as 3.0.
    rec = AuditRecord(seq=1, at=datetime(2026, 1, 1, tzinfo=UTC), verdict="accepted", code="ok", reason="",
                      principal="cli-a", kind="task_submitted", key="t", msg_id="m", ingress_seq=1, delivery=1,
                      event=EXAMPLES[TaskSubmitted])
    _, data = chain.seal(rec, chain.GENESIS)
    assert chain.verify([(1, data)]).seq == 1


def test_chain_verifies_and_names_the_first_altered_record() -> None:
    stored = _records(5)
    assert chain.verify(stored).seq == 5
    seq, data = stored[2]
    stored[2] = (seq, data.replace(b'"t3"', b'"t9"', 1))
    with pytest.raises(ChainError, match="seq 3"):
        chain.verify(stored)


def test_chain_finds_a_missing_record_and_non_canonical_bytes() -> None:
    stored = _records(4)
    with pytest.raises(ChainError, match="seq 2: missing") as missing:
        chain.verify([stored[0], *stored[2:]])
    assert missing.value.seq == 2
    seq, data = stored[1]
    with pytest.raises(ChainError, match="seq 2: stored bytes are not canonical"):
        chain.verify([stored[0], (seq, data.replace(b'{"seq"', b'{ "seq"', 1))])


def test_a_record_rehashed_after_editing_breaks_the_next_link() -> None:
    stored = _records(3)
    rec = msgspec.structs.replace(codec.decode_record(stored[1][1]), reason="edited")
    _, data = chain.seal(rec, codec.decode_record(stored[0][1]).hash)
    with pytest.raises(ChainError, match="seq 3: prev_hash"):
        chain.verify([stored[0], (2, data), stored[2]])


def test_subjects_keep_principal_kind_and_name_in_their_own_tokens() -> None:
    who = subjects.principal("agent", "echo-1")
    assert subjects.ingress(who, "task_started") == "in.agent.echo-1.task_started"
    assert subjects.parse_ingress("in.agent.echo-1.task_started") == (who, "task_started")
    assert subjects.parse_principal(who.token) == who
    assert subjects.work("llm.chat") == "work.llm.chat"
    assert subjects.work_consumer("llm.chat") == "skill-llm_chat"
    for bad in ("in.agent.echo-1", "in.robot.x.task_started", "in.agent.Echo.task_started", "in.agent.*.x"):
        with pytest.raises(subjects.SubjectError):
            subjects.parse_ingress(bad)
    with pytest.raises(subjects.SubjectError):
        subjects.audit("accepted", "task_started", "a.b")


def test_deeply_nested_input_is_a_schema_error_not_a_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","input":{"a":' + deep + b"}}"
    with pytest.raises(SchemaError, match="nested too deeply"):
        codec.decode_event(body)
    # Only Any-typed fields (input, output) can nest without limit.
    record = b'{"event":{"kind":"task_completed","id":"m","task_id":"t","attempt":1,"output":' + deep + b"}}"
    with pytest.raises(SchemaError, match="nested too deeply"):
        codec.decode_record(record)


def test_invalid_utf8_inside_a_string_is_a_schema_error_not_a_crash() -> None:
    with pytest.raises(SchemaError, match="not valid UTF-8"):
        codec.decode_event(b'{"kind":"task_submitted","id":"\xff\xfe","task_id":"t","skill":"echo"}')


def test_generated_ids_never_start_with_a_dash_which_a_command_line_reads_as_an_option() -> None:
    assert not any(new_id().startswith("-") for _ in range(5000))
