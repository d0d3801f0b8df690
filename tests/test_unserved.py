"""A task for a skill nobody serves is not left to wait in silence.

Nobody serves a skill when none of that name is installed beside the router and no live
agent offers it. By default the submission is accepted with code ``no_agent`` (it waits in
WORK for an agent with the skill) and ``agentctl submit --wait`` says so at once; policy
``[tasks] unserved`` may reject it instead, or hold it and propose an agent, as for a plan
step. The ``wordcount`` skill of examples/skill-package is installed only where its agent
runs, never beside the router: the deployment where this matters.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.events import AgentJoined, SkillUnmatched, TaskDispatched, TaskSubmitted, new_id
from ledgerbus.bus.messages import Heartbeat
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import (
    REPO,
    Procs,
    agentctl,
    audit_records,
    process_env,
    send,
    wait_for_record,
    wait_for_records,
    work_count,
)
from tests.test_proposals import cli, projected

WAIT_TIMEOUT = "120"
"""``--timeout`` of the waiting CLIs: far beyond what any assertion here waits for."""

SAID_AT_ONCE_S = 10.0
"""How soon a waiting CLI must say nobody serves the skill: its own start-up (Python and
its imports, on a loaded machine) included, and still well short of any wait's timeout."""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """examples/skill-package installed into a directory of its own, as ``pip install
    --target`` lays it out (its module and a dist-info naming its entry points), without
    needing pip: on an agent's PYTHONPATH it serves ``wordcount``; the router never sees it."""
    source = REPO / "examples" / "skill-package"
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    target = tmp_path / "site"
    shutil.copytree(source / "ledgerbus_wordcount", target / "ledgerbus_wordcount")
    info = target / f"ledgerbus_wordcount-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = [f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items())
              for group, entries in project["entry-points"].items()]
    (info / "entry_points.txt").write_text("\n".join(groups))
    return target


def flat(text: str) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces (rich wraps
    what it prints to a pipe at 80 columns)."""
    return " ".join(text.split())


class Waiting:
    """``agentctl submit ... --wait`` running, its stderr read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.said: list[str] = []

    @classmethod
    async def start(cls, settings: Settings, *args: str, **env: str) -> Waiting:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ledgerbus.agentctl", "submit", *args, "--wait", "--timeout", WAIT_TIMEOUT,
            env=process_env(settings, **env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def says(self, text: str, timeout: float = SAID_AT_ONCE_S) -> str:
        """Wait until a line of stderr contains ``text``; return that line."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                assert raw, f"agentctl exited without saying {text!r}; it said: {self.said}"
                line = raw.decode()
                self.said.append(line)
                if text in line:
                    return line

    async def finish(self, timeout: float = 90.0) -> tuple[int, str, str]:
        """Wait for the exit: ``(exit code, stdout, all of stderr)``."""
        async with asyncio.timeout(timeout):
            out, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        stderr = "".join(self.said) + err.decode()
        assert "Traceback" not in stderr, stderr
        return self.proc.returncode, out.decode(), stderr


async def test_a_task_nobody_serves_is_accepted_with_a_warning_wait_says_so_at_once_and_it_runs_once_an_agent_starts(
    site: Path, running_router: RunningRouter, admin: Client, settings: Settings, procs: Procs
) -> None:
    js = admin.jetstream()
    started = asyncio.get_running_loop().time()
    waiting = await Waiting.start(settings, "wordcount", "--input", '{"text": "a b a"}', "--task-id", "lonely")
    line = await waiting.says("no agent serves wordcount")
    assert asyncio.get_running_loop().time() - started < SAID_AT_ONCE_S
    assert line.startswith("warning: ") and "it waits in WORK until an agent with wordcount starts" in line

    record = await wait_for_record(js, lambda r: r.key == "lonely" and r.kind == "task_submitted")
    assert (record.verdict, record.code) == ("accepted", "no_agent")
    assert record.reason.startswith("no agent serves wordcount: it is not installed beside the router and no live "
                                    "agent offers it (live agents offer: nothing)")
    assert await work_count(js) == 1  # queued all the same: nothing is lost while nobody serves it

    # The user starts an agent with the skill: the waiting task is served as any other.
    await procs.start("counter-1", "agent", "--name", "counter-1", "--skills", "wordcount", PYTHONPATH=str(site))
    code, out, err = await waiting.finish()
    assert code == 0, err
    assert json.loads(out)["words"] == 3
    assert "completed task lonely wordcount by counter-1" in flat(err)

    # Now a live agent offers it: no warning, though it is still not installed beside the router.
    code, out, err = await agentctl(settings, "submit", "wordcount", "--input", '{"text": "b"}', "--task-id", "served",
                                    "--wait")
    assert code == 0 and "warning" not in err and "no agent" not in err, err
    served = await wait_for_record(js, lambda r: r.key == "served" and r.kind == "task_submitted")
    assert (served.verdict, served.code, served.reason) == ("accepted", "ok", "")


async def test_policy_reject_refuses_a_task_nobody_serves_with_one_record_and_nothing_queued(
    running_router: RunningRouter, admin: Client, settings: Settings
) -> None:
    js = admin.jetstream()
    settings.policy_path.write_text('[tasks]\nunserved = "reject"\n')
    started = asyncio.get_running_loop().time()
    code, out, err = await agentctl(settings, "submit", "nosuchskill", "--task-id", "typo", "--wait", "--timeout",
                                    WAIT_TIMEOUT)
    assert asyncio.get_running_loop().time() - started < SAID_AT_ONCE_S
    assert code == 1, err
    assert "rejected (no_agent): no agent serves nosuchskill: it is not installed beside the router" in flat(err)
    assert out == ""

    mine = [r for r in await audit_records(js) if r.key == "typo"]
    assert [(r.kind, r.verdict, r.code) for r in mine] == [("task_submitted", "rejected", "no_agent")]
    assert await work_count(js) == 0

    # An installed skill is served under the same policy: accepted, no warning.
    code, _, err = await agentctl(settings, "submit", "echo", "--task-id", "fine")
    assert code == 0, err
    fine = await wait_for_record(js, lambda r: r.key == "fine")
    assert (fine.verdict, fine.code, fine.reason) == ("accepted", "ok", "")
    assert await work_count(js) == 1


async def test_a_skill_an_agent_offers_is_never_flagged_however_new_the_router_or_the_agent(
    admin: Client, connect_as: Callable[[str], Awaitable[Client]], settings: Settings
) -> None:
    js = admin.jetstream()
    cli_nc, agent_nc = await connect_as("cli"), await connect_as("agent")
    # An agent (with a skill not installed here) heartbeats before the router starts, and a
    # submission of its skill is in INGRESS before the router serves its first batch.
    kv = await agent_nc.jetstream().key_value(subjects.AGENTS_BUCKET)
    beat = Heartbeat(agent="counter-1", instance="i1", skills=["wordcount"], concurrency=1, load=0,
                     at=datetime.now(UTC))
    await kv.put("counter-1.i1", codec.encode(beat))
    await send(cli_nc, "cli", "tester", TaskSubmitted(id=new_id(), task_id="early", skill="wordcount"))
    router = RunningRouter(await connect_as("router"), settings)
    await router.start()
    try:
        # An agent whose join the router audited before any heartbeat of it was seen.
        await send(agent_nc, "agent", "scribe-1", AgentJoined(id=new_id(), instance="i2", skills=["haiku"]))
        await wait_for_record(js, lambda r: r.kind == "agent_joined")
        await send(cli_nc, "cli", "tester", TaskSubmitted(id=new_id(), task_id="fresh", skill="haiku"))
        await send(cli_nc, "cli", "tester", TaskSubmitted(id=new_id(), task_id="nobody", skill="limerick"))
        records = await wait_for_records(js, 4)
    finally:
        await router.stop()
    verdicts = {r.key: (r.verdict, r.code) for r in records if r.kind == "task_submitted"}
    assert verdicts == {"early": ("accepted", "ok"), "fresh": ("accepted", "ok"),
                        "nobody": ("accepted", "no_agent")}
    [nobody] = [r for r in records if r.key == "nobody"]
    assert "no agent serves limerick" in nobody.reason and "(live agents offer: wordcount)" in nobody.reason


async def test_policy_propose_holds_a_task_nobody_serves_proposes_an_agent_and_runs_it_once_approved_and_started(
    procs: Procs, admin: Client, settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    js = admin.jetstream()
    profiles_path = tmp_path / "profiles.toml"
    env = {"LEDGERBUS_PROFILES_PATH": str(profiles_path)}
    settings.policy_path.write_text('[tasks]\nunserved = "propose"\n')
    await procs.start("router", "router", **env)
    await procs.start("projector", "projector", **env)

    # "timer" is no skill's name, but the installed sleep skill declares it as a capability.
    waiting = await Waiting.start(settings, "timer", "--input", '{"seconds": 0}', "--task-id", "nap", **env)
    line = await waiting.says("no agent serves timer", timeout=30.0)  # the router process may still be starting
    assert "it waits for a live skill that provides timer, and an agent is proposed" in line
    line = await waiting.says("proposal ")
    unmatched = await wait_for_record(js, lambda r: r.key == "nap" and r.kind == "skill_unmatched")
    assert isinstance(unmatched.event, SkillUnmatched)
    proposal_id, proposal = unmatched.event.id, unmatched.event.proposal
    assert (proposal.name, proposal.skills, proposal.capabilities) == ("timer-agent", ["sleep"], ["timer"])
    assert f"proposal {proposal_id}: an agent timer-agent with skills sleep would serve it" in line
    assert f"agentctl agents propose --approve {proposal_id}" in line

    submitted = await wait_for_record(js, lambda r: r.key == "nap" and r.kind == "task_submitted")
    assert (submitted.verdict, submitted.code) == ("accepted", "awaiting_match")
    assert await work_count(js) == 0  # held: nothing is queued for a skill nobody pulls

    await projected(admin, unmatched)
    code, out, err = await cli(settings, profiles_path, "agents", "propose", "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert (row["proposal_id"], row["task_id"], row["capabilities"], row["status"]) == (
        proposal_id, "nap", ["timer"], "proposed")
    pid_file = tmp_path / "nats.pid"
    assert nats_server.proc is not None
    pid_file.write_text(str(nats_server.proc.pid))
    code, _, err = await cli(settings, profiles_path, "agents", "propose", "--approve", proposal_id, "--pid-file",
                             str(pid_file))
    assert code == 0, err
    await nats_server.reload()
    await procs.start("timer-agent", "agent", "--profile", "timer-agent", **env)

    code, out, err = await waiting.finish()
    assert code == 0, err
    assert json.loads(out) == {"slept": 0}
    assert "completed task nap timer by timer-agent" in flat(err)
    assert "matched to the live skill sleep" in err
    records = [r for r in await audit_records(js) if r.key == "nap"]
    assert [(r.kind, r.principal) for r in records] == [
        ("task_submitted", "cli-tester"), ("skill_unmatched", "router"), ("task_dispatched", "router"),
        ("task_started", "agent-timer-agent"), ("task_completed", "agent-timer-agent")]
    dispatched = records[2].event
    assert isinstance(dispatched, TaskDispatched)
    assert (dispatched.skill, dispatched.reason, dispatched.dispatch) == ("sleep", "matched", 1)
