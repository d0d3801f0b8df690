"""The public client (ledgerbus.connect, connect_sync) against a real bus: router,
projector and agents as subprocesses, the client in this process as a program would use it.
One system serves every check, since starting it is what costs."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.client import Client

import ledgerbus
from ledgerbus.bus.settings import Settings
from tests.support import Procs, agentctl, wait_for_record
from tests.test_e2e import projected, start_system

POLICY = '[approval]\nskills = ["sleep"]\napprovers = ["cli-ops"]\n'


async def test_the_client_submits_waits_reads_and_decides(procs: Procs, admin: Client, settings: Settings) -> None:
    settings.policy_path.write_text(POLICY)
    await start_system(procs, admin, ("echo-1", "echo"), ("sleeper-1", "sleep"))

    async with ledgerbus.connect(settings=settings, name="tester") as bus:
        assert bus.principal.token == "cli-tester"
        # Submit and wait: the output, or a typed error for each way a task can end.
        handle = await bus.submit("echo", {"n": 1}, task_id="client-echo-1")
        assert (handle.task_id, handle.kind) == ("client-echo-1", "task")
        assert await handle.result(timeout=30) == {"n": 1}
        outcome = await handle.wait(timeout=30)  # waiting again reads the same ending from the log
        assert (outcome.status, outcome.agent, outcome.attempts, outcome.completed) == ("completed", "echo-1", 1, True)

        bad = await bus.submit("sleep", {"seconds": -1}, task_id="client-bad")
        verdict = await bad.verdict(timeout=30)  # the router's record: here, its refusal
        assert (verdict.accepted, verdict.code, verdict.key, verdict.msg_id) == (
            False, "invalid_input", "client-bad", bad.submission.id)
        with pytest.raises(ledgerbus.TaskRejected) as rejected:
            await bad.result(timeout=30)
        assert rejected.value.outcome.code == "invalid_input" and "seconds" in rejected.value.outcome.reason
        assert rejected.value.task_id == "client-bad"

        with pytest.raises(ledgerbus.SchemaError, match="timeout_s"):
            await bus.submit("echo", {}, timeout_s=-1)  # refused before anything is sent

        # Held for approval: the submitter waits; another principal approves or denies.
        held = await bus.submit("sleep", {"seconds": 0}, task_id="client-held-ok")
        denied = await bus.submit("sleep", {"seconds": 0}, task_id="client-held-no")
        assert ((await held.verdict(timeout=30)).accepted, (await held.verdict()).code) == (True, "approval_requested")
        with pytest.raises(ledgerbus.TaskTimeout) as waiting:
            await held.result(timeout=1.0)
        assert waiting.value.outcome.status == "awaiting_approval"
        with pytest.raises(ledgerbus.Refused, match="not_an_approver"):
            await bus.approve("client-held-ok")  # nobody approves their own task
        async with ledgerbus.connect(settings=settings, name="ops") as ops:
            assert [r["task_id"] for r in await ops.approvals()] == ["client-held-ok", "client-held-no"]
            record = await ops.approve("client-held-ok", "looked fine")
            assert (record.accepted, record.principal, record.key) == (True, "cli-ops", "client-held-ok")
            await ops.deny("client-held-no", "not today")
        assert await held.result(timeout=30) == {"slept": 0}
        with pytest.raises(ledgerbus.TaskDenied, match="not today"):
            await denied.result(timeout=30)

        # Reads: lists with filters and a cursor, lookups by prefix, the log.
        await projected(admin, "client-held-ok")
        await projected(admin, "client-held-no", "denied")
        first = await bus.list(skill="sleep", limit=1)
        second = await bus.list(skill="sleep", limit=1, before=first.next)
        assert [t["task_id"] for t in first.items + second.items] == ["client-held-no", "client-held-ok"]
        assert {t["skill"] for t in (await bus.list(agent="echo-1")).items} == {"echo"}
        assert (await bus.list(status="denied")).items[0]["task_id"] == "client-held-no"
        task = await bus.get("client-ec", history=True)  # a unique prefix of client-echo-1
        assert (task["task_id"], task["status"], task["output"]) == ("client-echo-1", "completed", {"n": 1})
        assert [h["kind"] for h in task["history"]] == ["task_submitted", "task_completed"]
        with pytest.raises(ledgerbus.NotFound, match="ambiguous: client-held-no, client-held-ok"):
            await bus.get("client-held")
        gone = await bus.get("client-bad")  # rejected: no task row, but the log knows it
        assert (gone["status"], gone["code"], gone["skill"]) == ("rejected", "invalid_input", "sleep")
        with pytest.raises(ledgerbus.NotFound, match="no task nothing-like-it"):
            await bus.get("nothing-like-it")
        kinds = [r.kind async for r in bus.events("client-held-ok")]
        assert kinds[:2] == ["task_submitted", "task_approved"] and kinds[-1] == "task_completed", kinds
        assert {a["name"]: a["replicas"] for a in await bus.agents()} == {"echo-1": 1, "sleeper-1": 1}
        stored = [data.decode() async for _, data in bus.stored("client-echo-1")]

        # A cancelled task, and a handle on a task someone else submitted.
        code, out, err = await agentctl(settings, "submit", "sleep", "--input", '{"seconds": 0}', "--task-id",
                                        "client-other", as_user="ops")
        assert code == 0, err
        other = bus.task("client-other")
        await bus.cancel("client-other", "changed my mind")
        with pytest.raises(ledgerbus.TaskCancelled, match="changed my mind"):
            await other.result(timeout=30)

    # The CLI is the same client: a prefix, a rejected task, ids whole in a narrow terminal.
    code, out, err = await agentctl(settings, "tasks", "show", "client-bad", "--json")
    assert code == 1 and json.loads(out)["status"] == "rejected", err
    code, out, err = await agentctl(settings, "tasks", "show", "client-bad")
    assert code == 1 and "rejected (invalid_input)" in out, err
    code, out, err = await agentctl(settings, "events", "--task", "client-echo-1", "--json")
    assert code == 0 and out.splitlines() == stored, err  # the stored bytes, exactly as hashed
    code, out, err = await agentctl(settings, "tasks", "--skill", "sleep", env={"COLUMNS": "60"})
    assert code == 0 and "client-held-ok" in out and "client-other" in out, err
    code, out, err = await agentctl(settings, "cancel", "client-held")
    assert code == 2 and "ambiguous" in err
    # Shell completion offers the task ids (from the projection) and skill names (installed).
    for words, offered in (("agentctl tasks show client-held", ["client-held-no", "client-held-ok"]),
                           ("agentctl approve client-e", ["client-echo-1"]), ("agentctl submit sl", ["sleep"])):
        code, out, err = await agentctl(settings, env={"_AGENTCTL_COMPLETE": "bash_complete", "COMP_WORDS": words,
                                                       "COMP_CWORD": str(len(words.split()) - 1)})
        assert code == 0 and out.split() == [f"plain,{o}" for o in offered], (words, out, err)


async def test_the_sync_client_for_scripts(procs: Procs, admin: Client, settings: Settings) -> None:
    await start_system(procs, admin, ("echo-1", "echo"))

    def script() -> tuple[object, list[str], str]:
        with ledgerbus.connect_sync(settings=settings, name="tester") as bus:
            handle = bus.submit("echo", {"text": "hi"})
            assert handle.verdict(timeout=30).code == "ok"
            output = handle.result(timeout=30)
            kinds = [r.kind for r in bus.events(handle.task_id)]
            try:
                bus.submit("echo", {"text": "x"}, task_id="a b")
            except ledgerbus.SchemaError as exc:
                problem = str(exc)
            return output, kinds, problem

    output, kinds, problem = await asyncio.to_thread(script)
    assert output == {"text": "hi"}
    assert kinds == ["task_submitted", "task_completed"]
    assert "task_id" in problem
    await wait_for_record(admin.jetstream(), lambda r: r.kind == "task_completed")
