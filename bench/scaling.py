"""Throughput of a sleep-bound skill with 1, 2 and 4 replicas of one agent.

N ``sleep`` tasks of S seconds are submitted at once (pipelined) to a router and R
replicas of one agent: the same name, so they share the skill's durable pull consumer
(``skill-sleep`` on WORK), each with concurrency 1. Tasks/s is N over the time from the
first submit to the last accepted ``task_completed`` record. The baseline, in the same
run, is one replica: R replicas / 1 replica is how much of the ideal R× the bus delivers
(a sleep-bound skill uses no CPU, so nothing but the bus stands between R and R×).

The replicas run in this process, each an :class:`~agents.runtime.Agent` with its own
connection and instance id, exactly what ``agentctl agent`` runs in each process; one
event loop is enough for work that only sleeps. Every configuration of every round gets
a fresh nats-server, and the order alternates between rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ledgerbus.agents.runtime import Agent
from ledgerbus.bus import codec, subjects
from ledgerbus.bus.connection import connect
from ledgerbus.bus.events import AgentJoined, TaskSubmitted, new_id
from ledgerbus.bus.identity import identity
from ledgerbus.bus.settings import Settings
from ledgerbus.plugins.sleep import SleepSkill
from ledgerbus.router.app import Router

AGENT = "sleeper"
PRINCIPAL = identity("agent", AGENT, ["sleep"])
"""The agent identity every replica connects as (the benchmark's server must know it)."""
CLI = subjects.principal("cli", "bench")

Server = Callable[[Callable[[Settings], Awaitable[float]]], Awaitable[float]]
"""Runs a body against a fresh, provisioned nats-server and returns what it returned."""


async def _joined(js: JetStreamContext, replicas: int, timeout: float) -> None:
    """Wait until ``replicas`` instances of the agent have joined (each is pulling right after)."""
    sub = await js.subscribe("audit.accepted.agent_joined.*", stream=subjects.AUDIT_STREAM, ordered_consumer=True)
    instances: set[str] = set()
    try:
        async with asyncio.timeout(timeout):
            while len(instances) < replicas:
                record = codec.decode_record((await sub.next_msg(timeout=timeout)).data)
                if isinstance(record.event, AgentJoined):
                    instances.add(record.event.instance)
    finally:
        await sub.unsubscribe()


async def _run_tasks(js: JetStreamContext, tasks: int, seconds: float) -> float:
    """Submit ``tasks`` sleeps at once; the seconds until the last one completed."""
    task_ids = [f"sleep{i}" for i in range(tasks)]
    pending = set(task_ids)
    finished: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def on_record(msg: Msg) -> None:
        record = codec.decode_record(msg.data)
        if finished.done():
            return
        if record.kind == "task_failed":
            finished.set_exception(RuntimeError(f"task {record.key} failed: {record.event}"))
        elif record.kind == "task_completed":
            pending.discard(record.key)
            if not pending:
                finished.set_result(time.perf_counter())

    follow = await js.subscribe("audit.accepted.*.*", stream=subjects.AUDIT_STREAM, ordered_consumer=True,
                                cb=on_record)
    subject = subjects.ingress(CLI, "task_submitted")
    try:
        start = time.perf_counter()
        acks = [await js.publish_async(subject, codec.encode(TaskSubmitted(
            id=new_id(), task_id=task_id, skill="sleep", input={"seconds": seconds}))) for task_id in task_ids]
        await asyncio.gather(*acks)
        # A stuck run (lost work, a claim never answered) must end the benchmark, not hang it.
        end = await asyncio.wait_for(finished, timeout=30 + 4 * tasks * seconds)
    finally:
        await follow.unsubscribe()
    return end - start


async def throughput(settings: Settings, replicas: int, tasks: int, seconds: float) -> float:
    """Tasks/s of ``replicas`` agent replicas (concurrency 1 each) draining ``tasks`` sleeps."""
    router_nc = await connect(settings, "router")
    cli = await connect(settings, CLI.token)
    agent_ncs = [await connect(settings, PRINCIPAL.user) for _ in range(replicas)]
    router = Router(router_nc, settings)
    await router.start()
    stop = asyncio.Event()
    runners = [asyncio.create_task(router.run(stop))] + [
        asyncio.create_task(Agent(nc, settings, AGENT, {"sleep": SleepSkill()}, concurrency=1).run(stop))
        for nc in agent_ncs
    ]
    conns: list[Client] = [router_nc, cli, *agent_ncs]
    js = cli.jetstream(timeout=30)
    try:
        await _joined(js, replicas, settings.connect_timeout_s)
        elapsed = await _run_tasks(js, tasks, seconds)
    finally:
        stop.set()
        await asyncio.gather(*runners)
        for nc in conns:
            await nc.close()
    return tasks / elapsed


async def run(
    tasks: int, seconds: float, replicas: list[int], rounds: int, server: Server, say: Any = print
) -> dict[str, Any]:
    """Median tasks/s per replica count over ``rounds``, each beside one replica's."""
    if 1 not in replicas:
        raise ValueError("one replica is the baseline: --replicas must include 1")
    rates: dict[int, list[float]] = {r: [] for r in replicas}
    for r in range(rounds):
        # Alternate the order so no replica count always runs on a warmer machine.
        for count in reversed(replicas) if r % 2 else replicas:
            async def body(settings: Settings, count: int = count) -> float:
                return await throughput(settings, count, tasks, seconds)

            rate = await server(body)
            rates[count].append(rate)
            say(f"round {r + 1}/{rounds}: {count} replica{'s' if count > 1 else ' '} {rate:>7.2f} tasks/s"
                f"   ({rate * seconds / count:.2f} of the ideal {count / seconds:g}/s)")
    medians = {count: statistics.median(found) for count, found in rates.items()}
    return {
        "tasks": tasks,
        "sleep_s": seconds,
        "rounds": rounds,
        "tasks_per_s": {str(c): m for c, m in medians.items()},
        "ideal_tasks_per_s": {str(c): c / seconds for c in replicas},
        "over_one_replica": {str(c): m / medians[1] for c, m in medians.items()},
        "rounds_tasks_per_s": {str(c): found for c, found in rates.items()},
    }
