"""Replicas: agent processes started with the same name share their skills' work.

Every replica pulls from the same durable consumer (``skill-<skill>`` on WORK), so adding
one spreads the tasks and never runs one twice. How much faster that is belongs in
``python -m bench --only scaling``, not here: timings never decide a test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from ledgerbus.bus.events import AgentJoined, TaskSubmitted, new_id
from ledgerbus.bus.records import AuditRecord
from tests.support import Procs, audit_records, send, wait_for_record

TASKS = 12
SECONDS = 0.3


async def test_two_replicas_of_one_agent_share_its_tasks_and_complete_each_exactly_once(
    procs: Procs, admin: Client, connect_as: Callable[[str], Awaitable[Client]]
) -> None:
    js = admin.jetstream()
    await procs.start("router", "router")
    replicas = [
        await procs.start(f"sleeper-1-replica-{i}", "agent", "--name", "sleeper-1", "--skills", "sleep",
                          "--concurrency", "1")
        for i in (1, 2)
    ]
    joined: set[str] = set()

    def both_joined(record: AuditRecord) -> bool:
        if record.accepted and isinstance(record.event, AgentJoined) and record.principal == "agent-sleeper-1":
            joined.add(record.event.instance)
        return len(joined) == len(replicas)

    await wait_for_record(js, both_joined)

    cli = await connect_as("cli")
    task_ids = [f"replicated-{i}" for i in range(TASKS)]
    for task_id in task_ids:
        await send(cli, "cli", "tester", TaskSubmitted(id=new_id(), task_id=task_id, skill="sleep",
                                                      input={"seconds": SECONDS}))
    finished: set[str] = set()

    def all_finished(record: AuditRecord) -> bool:
        if record.accepted and record.kind in ("task_completed", "task_failed") and record.key in task_ids:
            finished.add(record.key)
        return len(finished) == TASKS

    await wait_for_record(js, all_finished, timeout=30)

    records = await audit_records(js)
    accepted = [r for r in records if r.accepted]
    assert Counter(r.key for r in accepted if r.kind == "task_completed") == Counter(task_ids)
    assert [r.key for r in accepted if r.kind == "task_failed"] == []
    claims = Counter(r.key for r in accepted if r.kind == "task_started")

    # The records name the agent, not the replica: each replica's own log says which
    # tasks it ran (a run starts only after the router accepted its claim).
    runs: dict[str, list[str]] = {}
    for replica in replicas:
        lines = [line for line in replica.log_lines() if line.get("agent") == "sleeper-1"]
        [instance] = {line["instance"] for line in lines}
        runs[instance] = [line["task_id"] for line in lines if line.get("event") == "task_started"]
    assert set(runs) == joined, "each replica logs as the instance it joined as"
    assert all(runs.values()), f"a replica ran nothing: {runs}"
    assert Counter(t for ran in runs.values() for t in ran) == claims, "every accepted claim ran on one replica"
