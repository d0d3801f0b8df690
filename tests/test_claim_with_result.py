"""Claim and result together (docs/architecture.md, the task protocol): a skill that may
run before its claim (``claim_first = False``) sends its claim only after
``claim_after_s``; one that finishes sooner sends one result carrying the claim, which the
router checks as the claim and as the result, in one hop and one record.

Through a real router, a real agent runtime and a real nats-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.aio.client import Client

from ledgerbus.agents.runtime import Agent
from ledgerbus.agents.skill import SkillContext
from ledgerbus.bus import signing
from ledgerbus.bus.events import Claim, TaskCancelled, TaskCompleted, TaskSubmitted, new_id
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.router.claims import ClaimTokens
from tests.conftest import RunningRouter
from tests.support import audit_records, register_agent, send, wait_for_record

Connect = Callable[[str], Awaitable[Client]]


class Pure:
    """Sleeps ``input["seconds"]``, may report progress first, returns its input."""

    name = "echo"
    description = "a pure skill"
    claim_first = False
    uses_workspace = False

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def run(self, ctx: SkillContext, input: dict[str, Any]) -> Any:
        try:
            if input.get("progress"):
                await ctx.progress("half way", 0.5)
            await asyncio.sleep(input.get("seconds", 0))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return input


@pytest.fixture
async def pure(running_router: RunningRouter, connect_as: Connect, settings: Settings) -> AsyncIterator[Pure]:
    stop = asyncio.Event()
    skill = Pure()
    agent = Agent(await connect_as("agent-echo-1"), settings.replace(claim_after_s=0.3), "echo-1", {"echo": skill},
                  concurrency=4)
    task = asyncio.create_task(agent.run(stop))
    await wait_for_record((await connect_as("admin")).jetstream(), lambda r: r.kind == "agent_joined")
    yield skill
    stop.set()
    await task


async def history(admin: Client, task_id: str) -> list[tuple[str, str, str]]:
    return [(r.kind, r.verdict, r.code) for r in await audit_records(admin.jetstream()) if r.key == task_id]


async def submit(connect_as: Connect, task_id: str, input: dict[str, Any]) -> None:
    await send(await connect_as("cli"), "cli", "alice", TaskSubmitted(id=new_id(), task_id=task_id, skill="echo",
                                                                      input=input))


def ended(task_id: str) -> Callable[[AuditRecord], bool]:
    return lambda r: r.key == task_id and r.kind in ("task_completed", "task_failed")


async def test_a_quick_task_is_claimed_and_completed_by_one_record(
    pure: Pure, connect_as: Connect, admin: Client
) -> None:
    await submit(connect_as, "quick", {"seconds": 0})
    done = await wait_for_record(admin.jetstream(), ended("quick"))
    assert done.accepted and done.principal == "agent-echo-1"
    assert isinstance(done.event, TaskCompleted) and done.event.claim is not None
    assert done.event.claim.token.startswith("sha256:"), "the record keeps the token's fingerprint only"
    assert await history(admin, "quick") == [("task_submitted", "accepted", "ok"),
                                             ("task_completed", "accepted", "ok")]


async def test_a_task_still_running_after_claim_after_s_claims_first_and_reports_after(
    pure: Pure, connect_as: Connect, admin: Client
) -> None:
    await submit(connect_as, "slow", {"seconds": 0.8})
    done = await wait_for_record(admin.jetstream(), ended("slow"))
    assert done.accepted and isinstance(done.event, TaskCompleted) and done.event.claim is None
    assert [k for k, _, _ in await history(admin, "slow")] == ["task_submitted", "task_started", "task_completed"]


async def test_a_report_during_the_run_sends_the_claim_first(pure: Pure, connect_as: Connect, admin: Client) -> None:
    await submit(connect_as, "chatty", {"progress": True})
    await wait_for_record(admin.jetstream(), ended("chatty"))
    assert await history(admin, "chatty") == [
        ("task_submitted", "accepted", "ok"), ("task_started", "accepted", "ok"),
        ("task_progress", "accepted", "ok"), ("task_completed", "accepted", "ok")]


async def test_a_late_claim_refused_stops_the_skill_and_its_result_is_never_sent(
    pure: Pure, connect_as: Connect, admin: Client
) -> None:
    await submit(connect_as, "doomed", {"seconds": 30})
    # Cancelled before its claim is due: nobody holds a claim to tell, so the agent runs on
    # until it claims, is refused, and stops the skill.
    await wait_for_record(admin.jetstream(), lambda r: r.key == "doomed" and r.kind == "task_submitted")
    await send(await connect_as("cli"), "cli", "alice", TaskCancelled(id=new_id(), task_id="doomed"))
    refused = await wait_for_record(admin.jetstream(), lambda r: r.key == "doomed" and r.kind == "task_started")
    assert (refused.verdict, refused.code) == ("rejected", "task_terminal")
    await asyncio.wait_for(pure.cancelled.wait(), 10)
    await asyncio.sleep(0.5)
    assert [k for k, _, _ in await history(admin, "doomed")] == ["task_submitted", "task_cancelled", "task_started"]


async def test_a_carried_claim_must_prove_its_delivery_like_any_claim(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    js = admin.jetstream()
    await submit(connect_as, "queued", {})  # no agent pulls it
    attacker = await connect_as("agent")
    register_agent(settings, "mallory", ["echo"])
    forged = Claim(dispatch=1, token="x" * 43)
    await send(attacker, "agent", "mallory", TaskCompleted(id=new_id(), task_id="queued", attempt=1, output="forged",
                                                           claim=forged))
    refused = await wait_for_record(js, lambda r: r.key == "queued" and r.principal == "agent-mallory")
    assert (refused.kind, refused.verdict, refused.code) == ("task_completed", "rejected", "not_delivered")
    # An agent of another skill is refused for that, even with the real token.
    token = ClaimTokens(signing.load_or_create(settings.router_key_path)).token("queued", 1)
    register_agent(settings, "eve", ["sleep"])
    await send(attacker, "agent", "eve", TaskCompleted(id=new_id(), task_id="queued", attempt=1, output="forged",
                                                       claim=Claim(dispatch=1, token=token)))
    refused = await wait_for_record(js, lambda r: r.key == "queued" and r.principal == "agent-eve")
    assert (refused.kind, refused.verdict, refused.code) == ("task_completed", "rejected", "skill_not_held")
    # The delivery's holder claims and completes it in one record; nothing after counts.
    register_agent(settings, "trent", ["echo"])
    await send(attacker, "agent", "trent", TaskCompleted(id=new_id(), task_id="queued", attempt=1, output="done",
                                                         claim=Claim(dispatch=1, token=token)))
    done = await wait_for_record(js, lambda r: r.key == "queued" and r.principal == "agent-trent")
    assert (done.kind, done.verdict) == ("task_completed", "accepted")
    await send(attacker, "agent", "trent", TaskCompleted(id=new_id(), task_id="queued", attempt=2, output="again",
                                                         claim=Claim(dispatch=1, token=token)))
    again = await wait_for_record(js, lambda r: r.key == "queued" and r.seq > done.seq)
    assert (again.verdict, again.code) == ("rejected", "task_terminal")
