"""The LLM skills end to end: router, projector and agents as subprocesses, the agents'
LLM calls going through the real SDKs to a fake Anthropic API served by this test.

- ``llm.chat`` answers, and its usage (tokens, latency, cost) is recorded and queryable;
- ``plan``: a canned model answer becomes a validated plan that the scheduler runs; an
  invalid answer is retried once with the error, then the task fails saying why;
- the SOP pipeline runs its four roles on ``llm.chat``, each reading the last;
- ``reason``: a scripted model drives observe → reason → plan → act → validate with one
  failed validation and a second iteration; every phase is in the audit log.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.client import Client

from ledgerbus.bus.settings import Settings
from tests.fakellm import FakeLLM, answer
from tests.support import REPO, Procs, agentctl, audit_records, wait_for_record
from tests.test_e2e import joined, start_system
from tests.test_proposals import cli

ROUTING = """
[providers.fake]
type = "anthropic"
base_url = "{url}"
timeout_s = 10

[prices."fake-model"]
input = 3.0
output = 15.0

[default]
provider = "fake"
model = "fake-model"
max_tokens = 512
"""


ROLE_ROUTE = """
[roles."product-manager"]
provider = "fake"
model = "pm-model"
max_tokens = 512
"""


@pytest.fixture
def fake(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    """A fake Anthropic API, and the routing file that sends every LLM skill to it."""
    with FakeLLM() as llm:
        settings.llm_config_path.write_text(ROUTING.format(url=llm.url))
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")
        yield llm


async def submit(settings: Settings, skill: str, input: dict[str, Any], timeout: float = 60) -> tuple[int, dict]:
    code, out, err = await agentctl(settings, "submit", skill, "--input", json.dumps(input), "--wait", "--json",
                                    timeout=timeout)
    assert out, err
    return code, json.loads(out)


def structured(fake: FakeLLM) -> list[dict[str, Any]]:
    """The structured requests the fake received: the forced tool's name and the prompt."""
    return [{"tool": r.body["tool_choice"]["name"], "prompt": r.body["messages"][-1]["content"]}
            for r in fake.requests if r.body.get("tool_choice")]


async def test_llm_chat_answers_and_its_usage_is_recorded(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    fake.push(answer("Paris."))
    await start_system(procs, admin, ("thinker-1", "llm.chat"))
    code, task = await submit(settings, "llm.chat", {"prompt": "Capital of France?", "system": "Be brief."})
    assert code == 0, task
    assert task["output"]["text"] == "Paris.", [(r.path, r.body) for r in fake.requests]
    assert (task["output"]["provider"], task["output"]["model"]) == ("fake", "fake-model")
    [request] = fake.requests
    assert request.body["system"] == "Be brief." and request.body["max_tokens"] == 512
    # anthropic 2.x sends the key as a bearer token; older SDKs used x-api-key.
    assert "sk-ant-test-not-a-real-key" in (request.headers.get("x-api-key"),
                                            request.headers.get("authorization", "").removeprefix("Bearer "))

    records = await audit_records(admin.jetstream())
    [usage] = [r.event for r in records if r.kind == "task_usage"]
    assert (usage.provider, usage.model, usage.outcome) == ("fake", "fake-model", "ok")  # type: ignore[union-attr]
    assert usage.tokens_in > 0 and usage.tokens_out == 1 and usage.latency_s > 0  # type: ignore[union-attr]
    assert usage.cost_usd == pytest.approx((usage.tokens_in * 3 + 15) / 1e6)  # type: ignore[union-attr]
    assert not any("sk-ant-test" in json.dumps(r.raw or "") for r in records), "the key never reaches the log"

    code, out, err = await agentctl(settings, "usage", "--task", task["task_id"], "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert (row["provider"], row["calls"], row["failed"], row["tokens_out"]) == ("fake", 1, 0, 1)

    # Earlier steps' outputs past the context budget: the newest whole, the oldest summarised.
    first, second = "brief " * 50, "design " * 35
    fake.push(answer(first), answer(second), answer("SUMMARY OF THE BRIEF"), answer("built"))
    plan = {"steps": [
        {"id": "s1", "skill": "llm.chat", "input": {"prompt": "brief"}},
        {"id": "s2", "skill": "llm.chat", "input": {"prompt": "design"}, "deps": ["s1"]},
        {"id": "s3", "skill": "llm.chat", "input": {"prompt": "build", "context_chars": 400}, "deps": ["s1", "s2"]}]}
    code, out, err = await agentctl(settings, "submit", "--plan", "-", "--wait", "--json", stdin=json.dumps(plan))
    assert code == 0, out + err
    summarise, build = fake.requests[-2], fake.requests[-1]
    assert first.strip() in summarise.body["messages"][-1]["content"]
    prompt = build.body["messages"][-1]["content"]
    assert "## Summary of s1\nSUMMARY OF THE BRIEF" in prompt
    assert f"## Output of s2\n{second}" in prompt and first not in prompt


SIX = {"steps": [
    {"id": "setup_a", "skill": "echo", "input": {"do": "setup a"}},
    {"id": "setup_b", "skill": "echo", "input": {"do": "setup b"}},
    {"id": "report", "skill": "echo", "input": {"do": "report"}, "deps": ["setup_a", "setup_b"], "priority": 7},
]}


async def test_plan_turns_a_canned_answer_into_a_plan_that_runs(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    fake.push(answer(data=SIX))
    await start_system(procs, admin, ("thinker-1", "plan"), ("echo-1", "echo"))
    code, task = await submit(settings, "plan", {"task": "set up two things and report", "skills": ["echo"]})
    assert code == 0, task
    output = task["output"]
    assert output["status"] == "completed"
    assert [s["id"] for s in output["steps"]] == ["setup_a", "setup_b", "report"]
    plan_id = output["plan_task_id"]
    report = output["output"]["outputs"]["report"]
    assert report == {"do": "report"}
    # The plan ran as a subtask of the plan task: the router scheduled its steps.
    records = await audit_records(admin.jetstream())
    [submitted] = [r for r in records if r.kind == "plan_submitted" and r.key == plan_id]
    assert submitted.accepted and submitted.event.parent_task_id == task["task_id"]  # type: ignore[union-attr]
    dispatched = [r.key for r in records if r.kind == "task_dispatched"]
    assert dispatched.index(f"{plan_id}-report") > max(dispatched.index(f"{plan_id}-setup_{x}") for x in "ab")
    # The model was shown the skills it may use, with their input schemas.
    [asked] = structured(fake)
    assert asked["tool"] == "plan" and "- echo: Return the input unchanged." in asked["prompt"]


async def test_plan_retries_an_invalid_answer_once_with_the_error_then_fails_clearly(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    cycle = {"steps": [{"id": "a", "skill": "echo", "deps": ["b"]}, {"id": "b", "skill": "echo", "deps": ["a"]}]}
    fixed = {"steps": [{"id": "a", "skill": "echo"}]}
    fake.push(answer(data=cycle), answer(data=fixed), answer(data={"steps": []}), answer(data={"nope": 1}))
    await start_system(procs, admin, ("thinker-1", "plan"), ("echo-1", "echo"))

    code, task = await submit(settings, "plan", {"task": "one thing", "skills": ["echo"]})
    assert code == 0, task
    first, second = structured(fake)
    assert "That plan is invalid: dependency cycle: a -> b -> a" in fake.requests[1].body["messages"][-1]["content"]
    assert first["tool"] == second["tool"] == "plan"

    code, task = await submit(settings, "plan", {"task": "another", "skills": ["echo"]})
    assert code == 1
    assert task["status"] == "failed"
    assert task["error"].startswith("the model's plan was invalid twice; last error: unknown field")
    assert "`nope`" in task["error"]
    assert len(fake.requests) == 4, "one retry, no more"
    records = await audit_records(admin.jetstream())
    assert not [r for r in records if r.kind == "plan_submitted" and r.principal == "agent-thinker-1"][1:], (
        "only the valid plan was ever submitted")


def phases(iteration_one_progress: float) -> list[Any]:
    """A scripted model: iteration 1 acts and fails validation, iteration 2 passes."""
    return [
        answer(data={"facts": ["the goal needs the word echoed"]}),
        answer(data={"analysis": "ask the echo skill", "missing": ["the echo"]}),
        answer(data={"actions": [{"skill": "echo", "input": {"word": "hello"}, "why": "get the echo"}]}),
        answer(data={"done": False, "progress": iteration_one_progress, "feedback": "answer in capitals"}),
        answer(data={"facts": ["echo said hello", "capitals wanted"]}),
        answer(data={"analysis": "capitalise it"}),
        answer(data={"actions": []}),
        answer(data={"done": True, "progress": 1.0, "answer": "HELLO"}),
    ]


async def test_reason_runs_observe_reason_plan_act_validate_and_every_phase_is_audited(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    fake.push(*phases(0.5))
    await start_system(procs, admin, ("thinker-1", "reason"), ("echo-1", "echo"))
    code, task = await submit(settings, "reason", {"goal": "say hello loudly", "skills": ["echo"]})
    assert code == 0, task
    assert task["output"] == {"answer": "HELLO", "iterations": 2, "restarts": 0, "progress": 1.0}
    assert [r["tool"] for r in structured(fake)] == ["observe", "reason", "plan", "validate"] * 2
    # Iteration 2 was shown what iteration 1 did, the act's result and the feedback included.
    second_observe = structured(fake)[4]["prompt"]
    assert '"word": "hello"' in second_observe and "answer in capitals" in second_observe

    records = await audit_records(admin.jetstream())
    thoughts = [r.event.value for r in records  # type: ignore[union-attr]
                if r.kind == "memory_written" and r.accepted and r.event.section == "reasoning"]  # type: ignore[union-attr]
    assert [(t["iteration"], t["phase"]) for t in thoughts] == [
        (i, p) for i in (1, 2) for p in ("observe", "reason", "plan", "act", "validate")]
    assert thoughts[3]["output"] == [{"skill": "echo", "output": {"word": "hello"}}]
    assert thoughts[4]["output"]["done"] is False
    # The act was a delegated subtask of the reason task.
    [echo] = [r for r in records if r.kind == "task_submitted" and r.event.skill == "echo"]  # type: ignore[union-attr]
    assert echo.event.parent_task_id == task["task_id"]  # type: ignore[union-attr]

    # Validate is the same gate as a role's output: a "done" whose answer breaks the checks
    # is not done, and what it broke is the next iteration's feedback.
    fake.push(answer(data={"facts": []}), answer(data={"analysis": "greet"}), answer(data={"actions": []}),
              answer(data={"done": True, "progress": 1.0, "answer": "HELLO THERE"}),
              answer(data={"facts": ["too long"]}), answer(data={"analysis": "shorter"}), answer(data={"actions": []}),
              answer(data={"done": True, "progress": 1.0, "answer": "HI"}))
    code, gated = await submit(settings, "reason", {"goal": "greet briefly", "checks": {"max_chars": 5}})
    assert code == 0, gated
    assert (gated["output"]["answer"], gated["output"]["iterations"]) == ("HI", 2)
    records = await audit_records(admin.jetstream())
    verdicts = [r.event.value["output"] for r in records if r.kind == "memory_written" and r.accepted  # type: ignore[union-attr]
                and r.event.section == "reasoning" and r.event.value["phase"] == "validate"]  # type: ignore[union-attr]
    assert verdicts[-2]["done"] is False
    assert verdicts[-2]["feedback"] == "the answer breaks its guardrails: the output is 11 characters, more than 5"


async def test_reason_wipes_its_working_memory_once_when_stuck_then_fails_if_stuck_again(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    stuck = [answer(data={"facts": []}), answer(data={"analysis": "no idea"}), answer(data={"actions": []}),
             answer(data={"done": False, "progress": 0.0, "feedback": "still nothing"})]
    fake.push(*stuck * 4)
    await start_system(procs, admin, ("thinker-1", "reason"))
    code, task = await submit(settings, "reason", {"goal": "the impossible", "stuck_after": 2, "max_iterations": 6})
    assert code == 1
    assert task["error"].startswith("stuck again: no progress over 2 iterations after a fresh start (iteration 4)")
    records = await audit_records(admin.jetstream())
    wiped = [r for r in records if r.kind == "memory_wiped" and r.accepted]
    assert len(wiped) == 1 and "stuck at iteration 2" in wiped[0].event.reason  # type: ignore[union-attr]
    # After the wipe the model started from an empty working memory.
    assert "(empty)" in structured(fake)[8]["prompt"]


ROLES = ["product_manager", "architect", "developer", "qa"]
PROFILES = tomllib.loads((REPO / "profiles.toml").read_text())["profiles"]


def pm_answer(text: str = "product_manager says: done") -> Any:
    """The product manager's answer, keeping its checked guardrail (profiles.toml)."""
    return answer(f"{text}\nAcceptance criteria: each todo can be added, listed and removed.")


async def test_the_sop_pipeline_runs_each_role_on_its_agent_with_the_memory_of_every_earlier_role(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    fake.push(pm_answer(), *[answer(f"{role} says: done") for role in ROLES[1:]])
    await start_system(procs, admin, ("thinker-1", "llm.chat"))
    env = {"LEDGERBUS_PROFILES_PATH": str(REPO / "profiles.toml")}
    await procs.start("team", "agent", *[a for r in ROLES for a in ("--profile", r.replace("_", "-"))], **env)
    js = admin.jetstream()
    for role in ROLES:
        await wait_for_record(js, joined(role.replace("_", "-")))
    code, out, err = await cli(settings, REPO / "profiles.toml", "submit", "--pipeline", "sop", "a todo app",
                               "--wait", "--json")
    assert code == 0, err
    result = json.loads(out)
    outputs = result["output"]["outputs"]
    assert outputs["product_manager"]["text"].startswith("product_manager says: done")
    assert [outputs[r]["text"] for r in ROLES[1:]] == [f"{r} says: done" for r in ROLES[1:]]
    records = await audit_records(js)
    plan_id = result["task_id"]
    for i, (request, role) in enumerate(zip(fake.requests, ROLES, strict=True)):
        # Each role runs on its own agent (the team's), not on the generalist thinker-1...
        [done] = [r for r in records if r.key == f"{plan_id}-{role}" and r.kind == "task_completed" and r.accepted]
        assert done.principal == f"agent-{role.replace('_', '-')}"
        # ... speaks with its profile's instructions and guardrails...
        profile = PROFILES[role.replace("_", "-")]
        assert request.body["system"].startswith(profile["instructions"])
        assert profile["guardrails"][0] in request.body["system"]
        prompt = request.body["messages"][-1]["content"]
        assert prompt.startswith("a todo app")
        # ... and reads what every role before it wrote (the pipeline's memory), in order.
        for earlier in ROLES[:i]:
            assert f"## Output of {earlier}\n{earlier} says: done" in prompt, (role, earlier)
        # Each role took over from the one before it: a handoff record, before its dispatch.
        if i:
            [handoff] = [r for r in records if r.key == f"{plan_id}-{role}" and r.kind == "handoff"]
            assert (handoff.event.from_role, handoff.event.to_role) == (  # type: ignore[union-attr]
                ROLES[i - 1].replace("_", "-"), role.replace("_", "-"))
            assert handoff.event.from_task == f"{plan_id}-{ROLES[i - 1]}"  # type: ignore[union-attr]
            [dispatch] = [r for r in records if r.key == f"{plan_id}-{role}" and r.kind == "task_dispatched"]
            assert handoff.seq < dispatch.seq
    code, out, err = await agentctl(settings, "tasks", "show", f"{plan_id}-architect", env={"COLUMNS": "200"})
    assert code == 0, err
    assert f"handoff by router: from product-manager ({plan_id}-product_manager) to architect" in out, out


async def test_a_role_served_by_another_roles_agent_speaks_with_its_own_instructions_and_route(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    # The product manager's route has a model of its own; only the developer's agent runs.
    settings.llm_config_path.write_text(ROUTING.format(url=fake.url) + ROLE_ROUTE.format(url=fake.url))
    fake.push(pm_answer(), *[answer(f"{role} says: done") for role in ROLES[1:]])
    await start_system(procs, admin)
    await procs.start("developer", "agent", "--profile", "developer",
                      LEDGERBUS_PROFILES_PATH=str(REPO / "profiles.toml"))
    await wait_for_record(admin.jetstream(), joined("developer"))
    code, out, err = await cli(settings, REPO / "profiles.toml", "submit", "--pipeline", "sop", "a todo app",
                               "--wait", "--json")
    assert code == 0, err
    first = fake.requests[0]
    assert first.body["system"].startswith(PROFILES["product-manager"]["instructions"])
    assert PROFILES["developer"]["instructions"] not in first.body["system"]
    assert first.body["model"] == "pm-model"
    developer = fake.requests[2]
    assert developer.body["system"].startswith(PROFILES["developer"]["instructions"])
    assert developer.body["model"] == "fake-model"


async def test_a_role_whose_output_breaks_its_checked_guardrails_fails_and_is_retried_with_the_reason(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    # The product manager forgets its acceptance criteria once; the developer leaks a password once.
    fake.push(answer("a brief with no criteria"), pm_answer(), answer("architect says: done"),
              answer('DB_PASSWORD = "hunter2hunter2"'), answer("developer says: done"), answer("qa says: done"))
    await start_system(procs, admin, ("thinker-1", "llm.chat"))
    code, out, err = await cli(settings, REPO / "profiles.toml", "submit", "--pipeline", "sop", "a todo app",
                               "--retries", "2", "--wait", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["output"]["outputs"]["developer"]["text"] == "developer says: done"
    records = await audit_records(admin.jetstream())
    failed = {r.key.rsplit("-", 1)[-1]: r.event.error for r in records  # type: ignore[union-attr]
              if r.kind == "task_failed" and r.accepted and r.principal.startswith("agent-")}
    assert failed["product_manager"] == (
        "the product-manager's guardrails are not kept: the output does not contain 'acceptance criteria'")
    assert failed["developer"].startswith("the developer's guardrails are not kept: the output matches")
    assert "hunter2" in failed["developer"]  # where it matched, so a person can find it

    # A validator skill judges an answer against the guardrails in words: its "no" fails
    # the answer with its reason, and the retry's "yes" lets it through.
    asked = len(fake.requests)
    fake.push(answer("Why did the chicken cross the road?"),
              answer(data={"ok": False, "problems": ["it tells a joke"]}),
              answer("The road is 7 m wide."), answer(data={"ok": True, "problems": []}))
    code, out, err = await agentctl(settings, "submit", "llm.chat", "--input", json.dumps({
        "prompt": "How wide is the road?", "guardrails": ["No jokes."], "checks": {"validator": "llm.chat"}}),
        "--retries", "1", "--backoff", "0.1", "--wait", "--json", timeout=60)
    assert code == 0, out + err
    task = json.loads(out)
    assert task["output"]["text"] == "The road is 7 m wide."
    records = await audit_records(admin.jetstream())
    [judged] = [r for r in records if r.kind == "task_failed" and r.key == task["task_id"] and r.accepted]
    assert judged.event.error == (  # type: ignore[union-attr]
        "the answer's guardrails are not kept: the validator llm.chat: it tells a joke")
    # The validator's judgement is a subtask of the answer it judged, in the log and the tree.
    assert len([r for r in records if r.kind == "task_submitted"
                and r.event.parent_task_id == task["task_id"]]) == 2  # type: ignore[union-attr]
    assert "No jokes." in fake.requests[asked + 1].body["messages"][-1]["content"]


SPECIALIST = {"api_design": "backend", "ui_design": "frontend", "api": "backend", "ui": "frontend",
              "tests": "testing", "deploy": "devops"}


async def test_the_flask_react_example_runs_each_step_on_its_specialist_in_three_waves(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM
) -> None:
    # thinker-1 also serves llm.chat: a step must not land on it for lack of targeting.
    await start_system(procs, admin, ("thinker-1", "llm.chat"))
    await procs.start("team", "agent", "--profile", "backend", "--profile", "frontend", "--profile", "devops",
                      "--profile", "testing", LEDGERBUS_PROFILES_PATH=str(REPO / "profiles.toml"))
    js = admin.jetstream()
    for name in ("backend", "frontend", "devops", "testing"):
        await wait_for_record(js, joined(name))
    code, out, err = await cli(settings, REPO / "profiles.toml", "submit", "--plan",
                               str(REPO / "examples" / "flask-react.yaml"), "--wait", "--json")
    assert code == 0, err
    plan_id = json.loads(out)["task_id"]
    records = await audit_records(js)

    def one(step: str, kind: str) -> Any:
        [record] = [r for r in records if r.key == f"{plan_id}-{step}" and r.kind == kind and r.accepted]
        return record

    for step, agent in SPECIALIST.items():
        assert one(step, "task_dispatched").event.agent == agent, step
        assert one(step, "task_completed").principal == f"agent-{agent}", step
    # Waves [api_design, ui_design] -> [api, ui] -> [tests, deploy]: a step is dispatched
    # only after the steps it depends on completed, and the steps of a wave run together.
    waves = [("api_design", "ui_design"), ("api", "ui"), ("tests", "deploy")]
    assert max(one(s, "task_dispatched").seq for s in waves[0]) < min(one(s, "task_dispatched").seq for s in waves[1])
    assert max(one(s, "task_completed").seq for s in waves[1]) < min(one(s, "task_dispatched").seq for s in waves[2])
    for step, dep in (("api", "api_design"), ("ui", "ui_design")):
        assert one(dep, "task_completed").seq < one(step, "task_dispatched").seq
    # Each speaks with its specialist's instructions.
    systems = [r.body["system"] for r in fake.requests]
    for agent in ("backend", "frontend", "devops", "testing"):
        assert any(s.startswith(PROFILES[agent]["instructions"]) for s in systems), agent
