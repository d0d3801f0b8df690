"""A claim is bound to its delivery: only an agent that received the work item, and was
given its skill, can claim a task, and so only the agent that ran it can complete it.

The probes of the security issue, through a real router, real agents and a real
nats-server: an agent of another skill, or of the same skill that never received the
item, claiming with a higher attempt and completing with a forged output.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from ledgerbus.bus import codec, signing, subjects
from ledgerbus.bus.events import TaskCompleted, TaskStarted, TaskSubmitted, new_id
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.router.claims import ClaimTokens, fingerprint
from tests.support import (
    Procs,
    agentctl,
    audit_records,
    register_agent,
    send,
    stored_audit,
    wait_for_record,
    wait_until,
)


def verdict(task_id: str, kind: str, principal: str):  # type: ignore[no-untyped-def]
    return lambda r: r.key == task_id and r.kind == kind and r.principal == principal


async def test_another_agent_cannot_claim_or_complete_a_task_it_never_received(
    procs: Procs, admin: Client, settings: Settings, connect_as
) -> None:
    js = admin.jetstream()
    await procs.start("router", "router")
    await procs.start("sleeper-1", "agent", "--name", "sleeper-1", "--skills", "sleep")
    await wait_for_record(js, lambda r: r.kind == "agent_joined" and r.principal == "agent-sleeper-1")
    code, out, err = await agentctl(settings, "submit", "sleep", "--input", '{"seconds": 2}', "--json")
    assert code == 0, err
    task_id = json.loads(out)["task_id"]
    real = await wait_for_record(js, verdict(task_id, "task_started", "agent-sleeper-1"))
    assert real.accepted

    attacker = await connect_as("agent")  # may publish as any agent: the subject decides who speaks
    # echo-1 was given echo only; it claims the sleep task with a higher attempt.
    await send(attacker, "agent", "echo-1", TaskStarted(id=new_id(), task_id=task_id, attempt=9))
    refused = await wait_for_record(js, verdict(task_id, "task_started", "agent-echo-1"))
    assert (refused.verdict, refused.code) == ("rejected", "skill_not_held")
    assert "echo-1 was given echo, not sleep" in refused.reason
    # An agent that was given sleep but never received this item guesses at the token.
    register_agent(settings, "mallory", ["sleep"])
    await send(attacker, "agent", "mallory", TaskStarted(id=new_id(), task_id=task_id, attempt=9, token="x" * 43))
    refused = await wait_for_record(js, verdict(task_id, "task_started", "agent-mallory"))
    assert (refused.verdict, refused.code) == ("rejected", "not_delivered")
    # Its forged result is not the claimant's.
    await send(attacker, "agent", "mallory", TaskCompleted(id=new_id(), task_id=task_id, attempt=9, output="forged"))
    refused = await wait_for_record(js, verdict(task_id, "task_completed", "agent-mallory"))
    assert (refused.verdict, refused.code) == ("rejected", "not_claimant")

    done = await wait_for_record(js, verdict(task_id, "task_completed", "agent-sleeper-1"), timeout=30)
    assert done.accepted and done.event is not None and done.event.output == {"slept": 2.0}


async def test_a_queued_task_cannot_be_claimed_by_an_agent_that_did_not_pull_it(
    admin: Client, settings: Settings, connect_as, running_router
) -> None:
    js = admin.jetstream()
    cli, attacker = await connect_as("cli"), await connect_as("agent")
    await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="queued-1", skill="notes", input={"text": "x"}))
    # Nobody pulled it. scribe-1 was given notes but holds no delivery: no token, any attempt.
    for attempt in (1, 2, 50):
        await send(attacker, "agent", "scribe-1", TaskStarted(id=new_id(), task_id="queued-1", attempt=attempt))

    async def history() -> list[AuditRecord]:
        return [r for r in await audit_records(js) if r.key == "queued-1"]

    await wait_until(lambda: _at_least(history, 4), what="four records of queued-1")
    assert [(r.kind, r.code) for r in await history()] == (
        [("task_submitted", "ok")] + [("task_started", "not_delivered")] * 3)

    # The work item holds the token; presenting it is what a real delivery allows.
    stored = await js.get_msg(subjects.WORK_STREAM, 1)
    item = codec.decode_work(stored.data or b"")
    assert item.token == ClaimTokens(signing.load_or_create(settings.router_key_path)).token("queued-1", 1)
    await send(attacker, "agent", "scribe-1", TaskStarted(id=new_id(), task_id="queued-1", attempt=1, token=item.token))
    accepted = await wait_for_record(js, lambda r: r.key == "queued-1" and r.accepted and r.kind == "task_started")
    assert accepted.principal == "agent-scribe-1"
    # The log keeps the token's fingerprint, never the token: reading AUDIT gives nothing to present.
    assert isinstance(accepted.event, TaskStarted) and accepted.event.token == fingerprint(item.token)
    assert not any(item.token.encode() in data for _, data in await stored_audit(js))


async def _at_least(records: Callable[[], Awaitable[list[AuditRecord]]], n: int) -> bool:
    return len(await records()) >= n
