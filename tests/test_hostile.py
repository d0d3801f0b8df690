"""A table of hostile inputs: each gets its rejection code and exactly one audit record, and
the router keeps serving the valid traffic interleaved with them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import (
    CheckpointRestored,
    CheckpointSaved,
    MemoryWritten,
    TaskCompleted,
    TaskProgress,
    TaskStarted,
    TaskSubmitted,
    new_id,
)
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import claim, wait_for_records, work_count

Connect = Callable[[str], Awaitable[Client]]
SETUP_ID = "setup-submission"


def sub(**fields: object) -> bytes:
    """A task_submitted body with ``fields`` over valid defaults (None removes a field)."""
    body: dict[str, object] = {"kind": "task_submitted", "id": new_id(), "task_id": new_id(), "skill": "echo"}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


@dataclass
class Case:
    label: str
    code: str
    body: bytes
    role: str = "cli"
    name: str = "alice"
    kind: str = "task_submitted"
    headers: dict[str, str] = field(default_factory=dict)
    subject: str = ""


CASES = [
    Case("oversize body", "too_large", sub(input={"x": "a" * 300_000})),
    Case("empty body", "empty", b""),
    Case("invalid UTF-8", "schema", b'{"kind":"task_submitted","id":"\xff\xfe"}'),
    Case("invalid JSON", "schema", b'{"kind": "task_submitted",'),
    Case("JSON array", "schema", b"[1, 2, 3]"),
    Case("JSON string", "schema", b'"task_submitted"'),
    Case("NaN literal", "schema", b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","timeout_s":NaN}'),
    Case("wrong field type", "schema", sub(timeout_s="soon")),
    Case("input not an object", "schema", sub(input=[1, 2])),
    Case("unknown kind in body", "schema", b'{"kind":"task_exploded","id":"m"}'),
    Case("missing kind", "schema", b'{"id":"m","task_id":"t","skill":"echo"}'),
    Case("missing required field", "schema", sub(skill=None)),
    Case("unknown field", "schema", sub(priority=11)),
    Case("body claiming another sender", "schema", sub(sender="cli-bob")),
    Case("body claiming a principal", "schema", sub(principal="agent-root")),
    Case("deeply nested payload", "schema",
         b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","input":{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}}"),
    Case("huge number", "schema", sub(timeout_s=1e300)),
    Case("huge integer attempt", "schema",
         b'{"kind":"task_started","id":"m","task_id":"t","attempt":' + b"9" * 200 + b"}", role="agent", name="worker-1",
         kind="task_started"),
    Case("zero attempt", "schema", codec.encode({"kind": "task_started", "id": "m", "task_id": "t", "attempt": 0}),
         role="agent", name="worker-1", kind="task_started"),
    Case("task id with a dot", "schema", sub(task_id="a.b")),
    Case("skill name with spaces", "schema", sub(skill="rm -rf")),
    Case("subject kind differs from body", "kind_mismatch", sub(), kind="agent_joined"),
    Case("unknown kind token in subject", "kind_mismatch", sub(), kind="task_exploded"),
    Case("extra subject tokens", "bad_subject", sub(), subject="in.cli.alice.task_submitted.extra"),
    Case("cli sends an agent event", "kind_not_allowed",
         codec.encode(TaskStarted(id=new_id(), task_id="t-claimed", attempt=5)), kind="task_started"),
    Case("agent submits a skill its policy lacks", "skill_not_allowed", sub(), role="agent", name="worker-1"),
    Case("agent writes another agent's memory", "not_memory_owner",
         codec.encode(MemoryWritten(id=new_id(), agent="worker-2", section="observation", value="mine now")),
         role="agent", name="worker-1", kind="memory_written"),
    Case("knowledge write without a key", "bad_memory_write",
         codec.encode(MemoryWritten(id=new_id(), agent="worker-1", section="knowledge", value=1)),
         role="agent", name="worker-1", kind="memory_written"),
    Case("core flag on an observation", "bad_memory_write",
         codec.encode(MemoryWritten(id=new_id(), agent="worker-1", section="observation", value=1, core=True)),
         role="agent", name="worker-1", kind="memory_written"),
    Case("memory section that does not exist", "schema",
         codec.encode({"kind": "memory_written", "id": "m", "agent": "worker-1", "section": "soul", "value": 1}),
         kind="memory_written"),
    Case("restore of a checkpoint never saved", "unknown_checkpoint",
         codec.encode(CheckpointRestored(id=new_id(), agent="worker-1", checkpoint_id="nope")), kind="checkpoint_restored"),
    Case("checkpoint state over the bound", "checkpoint_too_large",
         codec.encode(CheckpointSaved(id=new_id(), agent="worker-1", checkpoint_id="big", state="x" * 70_000)),
         kind="checkpoint_saved"),
    Case("shared key too long", "schema",
         codec.encode({"kind": "shared_written", "id": "m", "namespace": "team", "key": "k" * 300, "value": 1}),
         kind="shared_written"),
    Case("client control header", "forbidden_header", sub(), headers={"Nats-Marker": "1"}),
    Case("expected-stream header", "forbidden_header", sub(), headers={"Nats-Expected-Stream": "INGRESS"}),
    Case("skill outside the policy", "skill_not_allowed", sub(skill="shell")),
    Case("duplicate task id", "duplicate_task", sub(task_id="t-claimed")),
    Case("reused message id, other content", "duplicate_message", sub(id=SETUP_ID),
         headers={subjects.HDR_MSG_ID: "fresh-header-id"}),
    Case("result from a non-claimant", "not_claimant",
         codec.encode(TaskCompleted(id=new_id(), task_id="t-claimed", attempt=1, output="mine")),
         role="agent", name="worker-2", kind="task_completed"),
    Case("progress from a non-claimant", "not_claimant",
         codec.encode(TaskProgress(id=new_id(), task_id="t-claimed", attempt=1, message="x")),
         role="agent", name="worker-2", kind="task_progress"),
    Case("stale claim", "stale_attempt", codec.encode(TaskStarted(id=new_id(), task_id="t-claimed", attempt=1)),
         role="agent", name="worker-2", kind="task_started"),
    Case("claim without its work item's token", "not_delivered",
         codec.encode(TaskStarted(id=new_id(), task_id="t-claimed", attempt=5)),
         role="agent", name="worker-1", kind="task_started"),
    Case("claim with a made-up token", "not_delivered",
         codec.encode(TaskStarted(id=new_id(), task_id="t-claimed", attempt=5, token="A" * 43)),
         role="agent", name="worker-1", kind="task_started"),
    Case("claim by an agent never given the skill", "skill_not_held",
         codec.encode(TaskStarted(id=new_id(), task_id="t-claimed", attempt=6)),
         role="agent", name="worker-3", kind="task_started"),
    Case("result for an unknown task", "unknown_task",
         codec.encode(TaskCompleted(id=new_id(), task_id="no-such-task", attempt=1)),
         role="agent", name="worker-1", kind="task_completed"),
    Case("payload carrying an API key", "secret_detected", sub(input={"key": "sk-ant-api03-" + "x" * 40})),
    Case("burst over the rate limit (1)", "ok", sub(), name="flood"),
    Case("burst over the rate limit (2)", "ok", sub(), name="flood"),
    Case("burst over the rate limit (3)", "rate_limited", sub(), name="flood"),
]


async def test_every_hostile_input_gets_its_code_one_record_and_the_router_keeps_serving(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    settings.policy_path.write_text(
        '[skills]\n"cli-*" = ["echo"]\n'
        '[rate_limits]\n"cli-flood" = { rate = 0.0001, burst = 2 }\n'
        '[secrets]\naction = "reject"\n'
    )
    router = RunningRouter(await connect_as("router"), settings)
    await router.start()
    conns = {"cli": await connect_as("cli"), "agent": await connect_as("agent")}
    try:
        setup = [
            ("cli", "alice", TaskSubmitted(id=SETUP_ID, task_id="t-claimed", skill="echo")),
            ("agent", "worker-1", claim(settings, "worker-1", "t-claimed", "echo")),
        ]
        for role, name, event in setup:
            await conns[role].jetstream().publish(
                subjects.ingress(subjects.principal(role, name), codec.encode(event)[9:].split(b'"')[0].decode()),
                codec.encode(event),
            )
        expected = ["ok", "ok"]
        for i, case in enumerate(CASES):
            subject = case.subject or subjects.ingress(subjects.principal(case.role, case.name), case.kind)
            await conns[case.role].jetstream().publish(subject, case.body, headers=case.headers or None)
            expected.append(case.code)
            # Valid traffic interleaved with the hostile: it must keep flowing.
            await conns["cli"].jetstream().publish(
                "in.cli.alice.task_submitted", codec.encode(TaskSubmitted(id=new_id(), task_id=f"ok-{i}", skill="echo"))
            )
            expected.append("ok")
        records = await wait_for_records(admin.jetstream(), len(expected), timeout=60)
        assert len(records) == len(expected), "exactly one record per message"
        got = [r.code for r in records]
        mismatches = [
            f"{CASES[(i - 2) // 2].label}: expected {want}, got {have} ({records[i].reason})"
            for i, (want, have) in enumerate(zip(expected, got, strict=True)) if want != have
        ]
        assert not mismatches, "\n".join(mismatches)
        assert len(CASES) >= 30
        assert not router._task.done()  # type: ignore[union-attr]
        accepted_submissions = [r for r in records if r.accepted and r.kind == "task_submitted"]
        assert await work_count(admin.jetstream()) == len(accepted_submissions)
    finally:
        await router.stop()
