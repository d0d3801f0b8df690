"""Budgets over trees: a budget on a task, plan or pipeline covers everything under it.

Through real processes and a fake LLM (tokens are words): a plan's budget stops the plan
when its steps together cross it; the ``plan`` skill's budget covers the plan it makes and
that plan's steps (the issue's 4,000-token plan whose tree used 12,305); an LLM call that
could cross what is left is not made; the CLI applies ``--budget-*`` to plans and pipelines
and refuses a cost budget nothing could reach.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from ledgerbus.bus.settings import Settings
from tests.fakellm import FakeLLM, answer
from tests.snapshot_support import assert_snapshots_fold_alike
from tests.support import REPO, Procs, agentctl, audit_records
from tests.test_e2e import start_system
from tests.test_llm_skills_e2e import fake  # noqa: F401 - the fake LLM fixture
from tests.test_proposals import cli

WORDS = " ".join(["word"] * 300)


def plan_file(tmp_path: Path, steps: list[dict[str, Any]], **extra: Any) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"name": "budgeted", "steps": steps, **extra}))
    return path


async def test_a_plans_budget_covers_its_steps_together_and_stops_the_plan(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM, tmp_path: Path  # noqa: F811
) -> None:
    # Three independent steps, each answered with 300 words: each fits the budget alone,
    # two together do not. (max_tokens 400 lets each call pass the check before it.)
    fake.push(*[answer(WORDS)] * 3)
    await start_system(procs, admin, ("thinker-1", "llm.chat"))
    steps = [{"id": f"s{i}", "skill": "llm.chat", "input": {"prompt": f"part {i}", "max_tokens": 400}}
             for i in range(3)]
    code, out, err = await agentctl(settings, "submit", "--plan", str(plan_file(tmp_path, steps)),
                                    "--budget-tokens", "500", "--wait", "--json", "--task-id", "bp")
    assert code == 1, err
    result = json.loads(out)
    assert result["status"] == "failed"
    records = await audit_records(admin.jetstream())
    [submitted] = [r for r in records if r.kind == "plan_submitted"]
    assert submitted.event.budget.tokens == 500  # type: ignore[union-attr]
    over = [r for r in records if r.kind == "task_usage" and r.code == "budget_exceeded"]
    assert len(over) == 1
    assert "tokens used under task bp of a budget of 500: task bp and everything under it stop" in over[0].reason
    [plan_end] = [r for r in records if r.key == "bp" and r.kind == "task_failed"]
    assert plan_end.principal == "router"
    assert plan_end.event.error.startswith("budget exceeded: ")  # type: ignore[union-attr]
    used = sum(r.event.tokens_in + r.event.tokens_out for r in records  # type: ignore[union-attr]
               if r.kind == "task_usage" and r.accepted)
    assert used <= 500 + 2 * 310, "at most the calls already in flight when it crossed"

    # A call that could cross what is left is not made at all.
    requests = len(fake.requests)
    code, out, err = await agentctl(settings, "submit", "llm.chat", "--input", json.dumps({"prompt": "hello"}),
                                    "--budget-tokens", "100", "--wait", "--json")
    assert code == 1, err
    failed = json.loads(out)
    assert failed["error"].startswith("not calling fake-model: the call may use ")
    assert f"the budget of task {failed['task_id']} has 100 left" in failed["error"]
    assert len(fake.requests) == requests, "the call was not made"
    # The log this test made, at rest: a snapshot anywhere in it plus the tail folds alike.
    await procs.stop_all()
    await assert_snapshots_fold_alike(admin.jetstream(), settings)


async def test_the_plan_skills_budget_covers_the_plan_it_makes_and_its_steps(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM  # noqa: F811
) -> None:
    steps = [{"id": f"s{i}", "skill": "llm.chat", "input": {"prompt": f"part {i}", "max_tokens": 100}}
             for i in range(4)]
    fake.push(answer(data={"steps": steps}), *[answer(" ".join(["word"] * 1500))] * 4)
    await start_system(procs, admin, ("thinker-1", "llm.chat,plan"))
    code, out, err = await agentctl(settings, "submit", "plan", "--input",
                                    json.dumps({"task": "four parts", "skills": ["llm.chat"]}),
                                    "--budget-tokens", "4000", "--wait", "--json", "--task-id", "tp", timeout=90)
    assert code == 1, out + err
    task = json.loads(out)
    assert task["status"] == "failed"
    assert "under task tp of a budget of 4000" in task["error"], task["error"]
    records = await audit_records(admin.jetstream())
    used = sum(r.event.tokens_in + r.event.tokens_out for r in records  # type: ignore[union-attr]
               if r.kind == "task_usage" and r.accepted)
    # The planner's call and at most the step calls in flight when the tree crossed 4,000:
    # never the 12,305 (the plan of four 1,500-word steps ran to the end before).
    assert used < 4000 + 2 * 1600, used
    plan_id = next(r.key for r in records if r.kind == "plan_submitted")
    ends = {r.key: r.kind for r in records if r.kind in ("task_failed", "task_cancelled", "task_completed")
            and r.accepted and r.key.startswith(plan_id)}
    assert ends[plan_id] in ("task_cancelled", "task_failed")
    assert len([k for k, kind in ends.items() if kind == "task_completed"]) < 4, "the tree was stopped"


async def test_the_cli_applies_budgets_to_pipelines_and_refuses_a_cost_budget_nothing_could_reach(
    procs: Procs, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    await start_system(procs, admin)
    profiles = REPO / "profiles.toml"
    settings.llm_config_path.write_text('[default]\nprovider = "none"\nmodel = "m"\n\n[providers.none]\n'
                                        'type = "anthropic"\n')
    code, _, err = await cli(settings, profiles, "submit", "--pipeline", "sop", "an app", "--budget-cost", "0.5")
    assert code == 2
    assert "--budget-cost needs prices" in err and "Traceback" not in err
    code, out, err = await cli(settings, profiles, "submit", "--pipeline", "sop", "an app", "--budget-tokens",
                               "9000", "--json", "--task-id", "sopb")
    assert code == 0, err
    records = await audit_records(admin.jetstream())
    [plan] = [r for r in records if r.kind == "plan_submitted" and r.key == "sopb"]
    assert plan.event.budget.tokens == 9000  # type: ignore[union-attr]
    path = plan_file(tmp_path, [{"id": "a", "skill": "echo"}], budget={"tokens": 10})
    code, _, err = await agentctl(settings, "submit", "--plan", str(path), "--budget-tokens", "5")
    assert code == 2 and "sets the plan's budget already" in err
