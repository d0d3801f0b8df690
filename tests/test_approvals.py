"""The approval gate: dangerous skills wait for an approver; denied tasks never reach WORK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import TaskApproved, TaskDenied, TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.snapshot_support import assert_snapshots_fold_alike
from tests.support import Procs, agentctl, claim, send, wait_for_record, wait_for_records, wait_until, work_count

Connect = Callable[[str], Awaitable[Client]]
POLICY = '[approval]\nskills = ["sleep"]\napprovers = ["cli-ops", "cli-alice"]\n'


async def test_held_tasks_run_only_when_an_approver_other_than_the_submitter_approves(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    settings.policy_path.write_text(POLICY)
    router = RunningRouter(await connect_as("router"), settings)
    await router.start()
    cli, agent, js = await connect_as("cli"), await connect_as("agent"), admin.jetstream()
    try:
        steps = [
            ("cli", "alice", TaskSubmitted(id=new_id(), task_id="t1", skill="sleep", input={"seconds": 0})),
            ("cli", "alice", TaskApproved(id=new_id(), task_id="t1")),
            ("cli", "bob", TaskApproved(id=new_id(), task_id="t1")),
            ("agent", "w1", claim(settings, "w1", "t1", "sleep")),
            ("cli", "ops", TaskApproved(id=new_id(), task_id="t1", reason="ok")),
            ("cli", "ops", TaskApproved(id=new_id(), task_id="t1")),
            ("cli", "alice", TaskSubmitted(id=new_id(), task_id="t2", skill="sleep")),
            ("cli", "ops", TaskDenied(id=new_id(), task_id="t2", reason="not today")),
            ("agent", "w1", claim(settings, "w1", "t2", "sleep")),
            ("cli", "alice", TaskSubmitted(id=new_id(), task_id="t3", skill="echo")),
            ("cli", "ops", TaskDenied(id=new_id(), task_id="nope")),
        ]
        for role, name, event in steps:
            await send(cli if role == "cli" else agent, role, name, event)
        records = await wait_for_records(js, len(steps))
        assert [(r.key, r.code) for r in records] == [
            ("t1", "approval_requested"),
            ("t1", "self_approval"),
            ("t1", "not_an_approver"),
            ("t1", "awaiting_approval"),
            ("t1", "ok"),
            ("t1", "not_awaiting_approval"),
            ("t2", "approval_requested"),
            ("t2", "ok"),
            ("t2", "task_terminal"),
            ("t3", "ok"),
            ("nope", "unknown_task"),
        ]
        assert records[0].verdict == "accepted"
        assert await work_count(js) == 2  # t1 once approved, and t3; never t2
        items = [codec.decode_work((await js.get_msg(subjects.WORK_STREAM, seq=s)).data) for s in (1, 2)]
        assert [(i.task_id, i.input, i.submitted_by) for i in items] == [
            ("t1", {"seconds": 0}, "cli-alice"), ("t3", {}, "cli-alice")]

        # A held task survives a router restart: the hold is in the log, not in memory.
        await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id="t4", skill="sleep"))
        await wait_for_records(js, len(steps) + 1)
        await router.stop()
        await router.start()
        await send(cli, "cli", "ops", TaskApproved(id=new_id(), task_id="t4"))
        await wait_for_record(js, lambda r: r.key == "t4" and r.kind == "task_approved" and r.accepted)

        async def dispatched() -> bool:
            return await work_count(js) == 3

        await wait_until(dispatched, what="t4 dispatched after the restart")
    finally:
        await router.stop()
    # Held, approved and denied tasks in the log: a snapshot anywhere plus the tail folds alike.
    await assert_snapshots_fold_alike(admin.jetstream(), settings)


async def test_approve_and_deny_from_the_cli_end_to_end(procs: Procs, admin: Client, settings: Settings) -> None:
    settings.policy_path.write_text(POLICY)
    js = admin.jetstream()
    await procs.start("router", "router")
    await procs.start("sleeper-1", "agent", "--name", "sleeper-1", "--skills", "sleep")
    await wait_for_record(js, lambda r: r.kind == "agent_joined")

    waiting = asyncio.create_task(agentctl(settings, "submit", "sleep", "--input", '{"seconds": 0}',
                                           "--task-id", "risky", "--wait", "--json", "--timeout", "30"))
    await wait_for_record(js, lambda r: r.key == "risky" and r.code == "approval_requested")
    code, _, err = await agentctl(settings, "approve", "risky", as_user="tester")
    assert code == 1 and "not_an_approver" in err
    code, _, err = await agentctl(settings, "approve", "risky", "--reason", "reviewed", as_user="ops")
    assert code == 0, err
    code, out, err = await waiting
    assert code == 0, err
    assert (json.loads(out)["status"], json.loads(out)["output"]) == ("completed", {"slept": 0})

    waiting = asyncio.create_task(agentctl(settings, "submit", "sleep", "--task-id", "refused", "--wait", "--json"))
    await wait_for_record(js, lambda r: r.key == "refused" and r.code == "approval_requested")
    code, _, err = await agentctl(settings, "deny", "refused", "--reason", "too risky", as_user="ops")
    assert code == 0, err
    code, out, _ = await waiting
    assert code == 1
    assert (json.loads(out)["status"], json.loads(out)["error"]) == ("denied", "denied by cli-ops: too risky")
