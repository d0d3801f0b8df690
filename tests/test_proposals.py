"""Agent profiles, proposals and the SOP pipeline, end to end with every process real.

A plan step that names capabilities no live agent offers waits, with a proposed agent;
an operator approves it with ``agentctl agents propose --approve ID`` (a profile in the
profiles file and an identity), starts it with ``agentctl agent --profile NAME``, and the
step runs. ``agentctl submit --pipeline sop`` plays one role profile after another.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.agents import profiles
from ledgerbus.bus import query
from ledgerbus.bus.errors import QueryError
from ledgerbus.bus.events import AgentJoined, PlanSubmitted, SkillUnmatched
from ledgerbus.bus.identity import Registry
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from tests.fakellm import FakeLLM, answer
from tests.snapshot_support import assert_snapshots_fold_alike
from tests.support import Procs, audit_records, process_env, wait_for_record, wait_until


async def cli(settings: Settings, profiles_path: Path, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """``agentctl ARGS`` as CLI user ``tester`` with this profiles file, in its directory
    (so a relative ``var/nats.pid`` is never the repository's)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.agentctl", *args, cwd=profiles_path.parent,
        env=process_env(settings, LEDGERBUS_PROFILES_PATH=str(profiles_path)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def projected(admin: Client, record: AuditRecord) -> None:
    """Wait until the projector (once it answers at all) has applied ``record``."""

    async def applied() -> bool:
        try:
            await query.ask(admin, "audit", "verdict", {"msg_id": record.msg_id, "wait_s": 5}, timeout=10)
        except QueryError:
            return False  # the projector is still starting
        return True

    await wait_until(applied, what=f"record {record.seq} in the projection")


def of(records: list[AuditRecord], key: str, kind: str) -> list[AuditRecord]:
    return [r for r in records if r.key == key and r.kind == kind and r.accepted]


async def nap_waiting_for_a_timer(procs: Procs, admin: Client, settings: Settings, tmp_path: Path,
                                  task_id: str) -> tuple[Path, dict[str, str], AuditRecord]:
    """Router and projector with a profiles file of their own (not made yet), and plan
    ``task_id`` whose one step needs a timer nobody serves: the profiles file, the processes'
    environment, and the step's ``skill_unmatched`` record."""
    profiles_path = tmp_path / "profiles.toml"
    env = {"LEDGERBUS_PROFILES_PATH": str(profiles_path)}
    await procs.start("router", "router", **env)
    await procs.start("projector", "projector", **env)
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: needs a timer\nsteps:\n  - {id: nap, capabilities: [wait], input: {seconds: 0}}\n")
    code, _, err = await cli(settings, profiles_path, "submit", "--plan", str(plan), "--task-id", task_id, "--json")
    assert code == 0, err
    unmatched = await wait_for_record(admin.jetstream(),
                                      lambda r: r.key == f"{task_id}-nap" and r.kind == "skill_unmatched")
    return profiles_path, env, unmatched


async def test_an_unmatched_step_waits_for_its_approved_proposal_then_runs_on_the_proposed_agent(
    procs: Procs, admin: Client, settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    js = admin.jetstream()
    profiles_path, env, unmatched = await nap_waiting_for_a_timer(procs, admin, settings, tmp_path, "naps")
    assert isinstance(unmatched.event, SkillUnmatched)
    proposal = unmatched.event.proposal
    # The installed sleep skill declares ("wait", "timer"), so the proposal is an agent serving it.
    assert (proposal.name, proposal.skills, proposal.capabilities) == ("wait-agent", ["sleep"], ["wait"])
    proposal_id = unmatched.event.id

    await projected(admin, unmatched)
    code, out, err = await cli(settings, profiles_path, "agents", "propose", "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert (row["proposal_id"], row["task_id"], row["capabilities"], row["name"], row["skills"], row["status"]) == (
        proposal_id, "naps-nap", ["wait"], "wait-agent", ["sleep"], "proposed")
    code, out, err = await cli(settings, profiles_path, "agents", "propose")
    assert code == 0 and proposal_id in out and "wait-agent" in out, err

    pid_file = tmp_path / "nats.pid"
    assert nats_server.proc is not None
    pid_file.write_text(str(nats_server.proc.pid))
    code, out, err = await cli(settings, profiles_path, "agents", "propose", "--approve", proposal_id,
                               "--pid-file", str(pid_file), "--json")
    assert code == 0, err
    approval = json.loads(out)
    assert (approval["profile"], approval["record"]["verdict"], approval["record"]["kind"]) == (
        "wait-agent", "accepted", "proposal_approved")
    assert "asked nats-server to reload its configuration" in err
    # No LLM route here: the proposal's own template, said in one line.
    assert "instructions from the proposal's template (" in err

    # Nothing ran before the approval: the step only waited.
    records = await audit_records(js)
    assert [r.kind for r in records if r.key == "naps-nap"] == ["skill_unmatched"]
    assert profiles.get(profiles_path, "wait-agent") == profiles.Profile(
        instructions=proposal.prompt, skills=["sleep"], capabilities=["wait"])
    ident, _ = Registry.load(settings.auth_dir).entries["agent-wait-agent"]
    assert ident.skills == ("sleep",)

    # Approving again is refused by the projection's word, or else the router's.
    approved = await wait_for_record(js, lambda r: r.kind == "proposal_approved" and r.key == proposal_id)
    await projected(admin, approved)
    code, _, err = await cli(settings, profiles_path, "agents", "propose", "--approve", proposal_id,
                             "--profile", "another")
    assert code == 1 and "already approved, as profile wait-agent" in err, err

    await nats_server.reload()  # the CLI asked for it; this waits until a reload is done
    await procs.start("wait-agent", "agent", "--profile", "wait-agent", **env)
    joined = await wait_for_record(js, lambda r: r.kind == "agent_joined" and r.principal == "agent-wait-agent")
    assert isinstance(joined.event, AgentJoined)
    assert joined.event.profile == "wait-agent"
    assert "wait" in joined.event.capabilities["sleep"]

    dispatched = await wait_for_record(js, lambda r: r.key == "naps-nap" and r.kind == "task_dispatched")
    assert (dispatched.event.skill, dispatched.event.reason) == ("sleep", "matched")  # type: ignore[union-attr]
    end = await wait_for_record(js, lambda r: r.key == "naps" and r.kind in ("task_completed", "task_failed"))
    assert end.kind == "task_completed", end
    assert end.event.output["outputs"] == {"nap": {"slept": 0}}  # type: ignore[union-attr]
    started = of(await audit_records(js), "naps-nap", "task_started")
    assert [r.principal for r in started] == ["agent-wait-agent"]

    code, out, _ = await cli(settings, profiles_path, "agents", "propose", "--json")
    [row] = json.loads(out)
    assert (row["status"], row["profile"], row["approved_by"]) == ("approved", "wait-agent", "cli-tester")


PROPOSALS_ROUTING = """
[providers.fake]
type = "anthropic"
base_url = "{url}"
timeout_s = 10

[skills.proposals]
provider = "fake"
model = "fake-model"
max_tokens = 600
"""


async def test_a_one_off_approval_takes_its_instructions_from_the_llm_and_starts_the_agent_the_step_waits_for(
    procs: Procs, admin: Client, settings: Settings, nats_server: NatsServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    js = admin.jetstream()
    profiles_path, _, unmatched = await nap_waiting_for_a_timer(procs, admin, settings, tmp_path, "once")
    await projected(admin, unmatched)
    pid_file = tmp_path / "nats.pid"
    assert nats_server.proc is not None
    pid_file.write_text(str(nats_server.proc.pid))
    with FakeLLM() as fake:
        fake.push(answer("You wait for the time a step asks, then say you are done."))
        settings.llm_config_path.write_text(PROPOSALS_ROUTING.format(url=fake.url))
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")
        code, out, err = await cli(settings, profiles_path, "agents", "propose", "--approve", unmatched.event.id,
                                   "--once", "--start", "--pid-file", str(pid_file), "--json")
        assert code == 0, err
        [request] = fake.requests
    approval = json.loads(out)
    started = approval["started"]["pid"]
    try:
        assert approval["saved"] is False and approval["instructions_from"] == "the LLM route for proposals"
        assert "wait" in request.body["messages"][-1]["content"]
        # One-off: the project's profiles file is untouched; the run's copy has the LLM's words.
        assert not profiles_path.exists()
        kept = tmp_path / "var" / "proposals" / "wait-agent.toml"
        assert profiles.get(kept, "wait-agent").instructions == (
            "You wait for the time a step asks, then say you are done.")
        approved = await wait_for_record(js, lambda r: r.kind == "proposal_approved")
        assert approved.event.saved is False  # type: ignore[union-attr]
        # --start: the agent comes up by itself, and the waiting step runs on it.
        end = await wait_for_record(js, lambda r: r.key == "once" and r.kind in ("task_completed", "task_failed"), 60)
        assert end.kind == "task_completed", end
        [done] = of(await audit_records(js), "once-nap", "task_completed")
        assert done.principal == "agent-wait-agent"
    finally:
        os.kill(started, signal.SIGTERM)


ROLE_PROFILES = """
[profiles.product-manager]
instructions = "Write the brief."
skills = ["echo"]
handoffs = ["architect"]
guardrails = ["Only what was asked."]

[profiles.architect]
instructions = "Design it."
skills = ["echo"]
handoffs = ["developer"]

[profiles.developer]
instructions = "Build it."
skills = ["echo"]
handoffs = ["qa"]

[profiles.qa]
instructions = "Test it."
skills = ["echo"]
"""


async def test_the_sop_pipeline_plays_each_role_in_turn_with_its_profile(
    procs: Procs, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    js = admin.jetstream()
    profiles_path = tmp_path / "profiles.toml"
    profiles_path.write_text(ROLE_PROFILES)
    await procs.start("router", "router")
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo")
    await wait_for_record(js, lambda r: r.kind == "agent_joined" and r.principal == "agent-echo-1")

    code, out, err = await cli(settings, profiles_path, "submit", "--pipeline", "sop", "a todo app",
                               "--task-id", "sop1", "--wait", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "completed"
    assert list(result["steps"]) == ["product_manager", "architect", "developer", "qa"]
    outputs = result["output"]["outputs"]
    roles = {"product_manager": ("product-manager", "Write the brief.", ["architect"]),
             "architect": ("architect", "Design it.", ["developer"]),
             "developer": ("developer", "Build it.", ["qa"]), "qa": ("qa", "Test it.", [])}
    for step, (role, instructions, handoffs) in roles.items():
        assert outputs[step]["requirement"] == "a todo app"
        assert (outputs[step]["role"], outputs[step]["instructions"], outputs[step]["handoffs"]) == (
            role, instructions, handoffs)
    assert outputs["product_manager"]["guardrails"] == ["Only what was asked."]

    records = await audit_records(js)
    [submitted] = of(records, "sop1", "plan_submitted")
    assert isinstance(submitted.event, PlanSubmitted)
    # Each role depends on every role before it: its context is the pipeline's memory.
    assert [(s.id, s.skill, s.deps, s.role) for s in submitted.event.steps] == [
        ("product_manager", "echo", [], "product-manager"),
        ("architect", "echo", ["product_manager"], "architect"),
        ("developer", "echo", ["product_manager", "architect"], "developer"),
        ("qa", "echo", ["product_manager", "architect", "developer"], "qa")]
    # A chain: each role starts only once the role before it has finished.
    order = ["product_manager", "architect", "developer", "qa"]
    for before, after in itertools.pairwise(order):
        finished = of(records, f"sop1-{before}", "task_completed")[0].seq
        assert finished < of(records, f"sop1-{after}", "task_dispatched")[0].seq
    # The log this test made, at rest: a snapshot anywhere in it plus the tail folds alike.
    await procs.stop_all()
    await assert_snapshots_fold_alike(admin.jetstream(), settings)


async def test_profile_file_errors_name_the_file_the_profile_and_the_field(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.coder]\ninstructions = "Code."\nskills = ["echo"]\n\n'
                    '[profiles.typo]\ninstructions = "x"\nskills = ["echo"]\ntools = ["git"]\n')
    code, _, err = await cli(settings, path, "agent", "--profile", "coder")
    assert code == 3, err
    assert f"profiles {path}: unknown field `tools` - at `profiles.typo`" in err
    assert "Traceback" not in err

    path.write_text('[profiles.coder]\ninstructions = "Code."\nskills = ["echo"]\nconcurrency = 0\n\n'
                    '[profiles.tester]\ninstructions = "Test."\nskills = ["echo"]\n')
    code, _, err = await cli(settings, path, "agent", "--profile", "coder")
    assert code == 3 and "expected int >= 1 - at `profiles.coder.concurrency`" in err, err

    path.write_text('[profiles.coder]\ninstructions = "Code."\nskills = ["echo"]\n\n'
                    '[profiles.tester]\ninstructions = "Test."\nskills = ["echo"]\n')
    code, _, err = await cli(settings, path, "agent", "--profile", "ghost")
    assert code == 2 and f"no profile 'ghost' in {path} (known: coder, tester)" in err, err
    code, _, err = await cli(settings, path, "agent", "--profile", "coder", "--name", "coder")
    assert code == 2 and "without --name and --skills" in err, err
    code, _, err = await cli(settings, path, "submit", "--pipeline", "sop", "a todo app")
    assert code == 3 and "missing: product-manager, architect, developer, qa (known: coder, tester)" in err, err
    code, _, err = await cli(settings, tmp_path / "none.toml", "agent", "--profile", "coder")
    assert code == 3 and f"no profiles file at {tmp_path / 'none.toml'}" in err, err


def test_adding_a_profile_keeps_the_file_and_never_replaces_one(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    text = '# my agents\n[profiles.coder]\ninstructions = "Code."\nskills = ["echo"]\n'
    path.write_text(text)
    tricky = profiles.Profile(instructions='Say "hi"\n\tthen stop \x7f — ünïcode 😀', skills=["sleep"],
                              capabilities=["wait"], concurrency=3)
    profiles.add(path, "timer", tricky)
    assert path.read_text().startswith(text)
    assert profiles.get(path, "timer") == tricky
    with pytest.raises(profiles.ProfileError, match="profile 'coder' already exists"):
        profiles.add(path, "coder", tricky)
    assert profiles.get(path, "coder") == profiles.Profile(instructions="Code.", skills=["echo"])
    fresh = tmp_path / "new" / "profiles.toml"
    profiles.add(fresh, "timer", tricky)
    assert profiles.load(fresh).profiles == {"timer": tricky}
