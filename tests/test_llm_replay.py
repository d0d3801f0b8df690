"""LLM calls recorded, replayed and forked, end to end (docs/replay.md).

Router, projector and agents are subprocesses; the model is a fake Anthropic API served by
the test (tests/fakellm.py), reached through the real SDK, and then shut down, so every
answer a fork gets comes from the recordings:

- every answered call is stored by content hash, named by its ``task_usage`` record, and
  shown by ``agentctl llm show`` (a changed body is refused);
- a recorded SOP pipeline forked with ``--live`` after its first role asks the model for
  the calls after the fork point; with the model gone, forked from its submission it re-runs
  and gets the same outputs, step for step; forked after its second role, the two roles done
  by then are kept and the others re-run from the recording;
- the agents' memory is restored to the fork point through a checkpoint;
- the ``reason`` loop that wipes its memory when stuck does so again, from the recording.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from ledgerbus.agents.llm import calls
from ledgerbus.bus import subjects
from ledgerbus.bus.settings import Settings
from tests.fakellm import FakeLLM, answer
from tests.support import REPO, Procs, agentctl, audit_records, wait_for_record
from tests.test_e2e import joined, start_system
from tests.test_llm_skills_e2e import ROLES, fake, pm_answer  # noqa: F401
from tests.test_proposals import cli


async def start_team(procs: Procs, admin: Client) -> None:
    await start_system(procs, admin, ("thinker-1", "llm.chat"))
    env = {"LEDGERBUS_PROFILES_PATH": str(REPO / "profiles.toml")}
    await procs.start("team", "agent", *[a for r in ROLES for a in ("--profile", r.replace("_", "-"))], **env)
    for role in ROLES:
        await wait_for_record(admin.jetstream(), joined(role.replace("_", "-")))


async def run_pipeline(settings: Settings) -> dict[str, Any]:
    code, out, err = await cli(settings, REPO / "profiles.toml", "submit", "--pipeline", "sop", "a todo app",
                               "--wait", "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


async def fork(settings: Settings, task_id: str, at: int, *more: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = await agentctl(settings, "fork", task_id, "--at", str(at), "--wait", "--json", *more,
                                    timeout=120)
    return code, (json.loads(out) if out.strip() else {}), err


def texts(outputs: dict[str, Any]) -> dict[str, str]:
    return {role: outputs[role]["text"] for role in ROLES}


async def test_a_recorded_pipeline_forks_with_no_model_and_gives_the_same_outputs_step_for_step(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM  # noqa: F811
) -> None:
    fake.push(pm_answer(), *[answer(f"{role} says: done") for role in ROLES[1:]])
    await start_team(procs, admin)
    original = await run_pipeline(settings)
    plan_id = original["task_id"]
    js = admin.jetstream()
    records = await audit_records(js)

    # Every answered call is recorded, and its usage record names it.
    usages = [r for r in records if r.kind == "task_usage" and r.accepted]
    assert len(usages) == 4 and all(calls.is_call_hash(u.event.call) for u in usages)  # type: ignore[union-attr]
    first = usages[0].event.call  # type: ignore[union-attr]
    stored = await calls.fetch(js, first)
    assert stored.task_id == f"{plan_id}-product_manager" and stored.path == "plan/product_manager"
    assert stored.request.messages[-1].content.startswith("a todo app")
    assert stored.answer is not None and stored.answer.text.startswith("product_manager says: done")
    assert stored.request_hash == calls.request_hash(stored.request)

    code, out, err = await agentctl(settings, "usage", "--calls", "--task", f"{plan_id}-product_manager", "--json")
    assert code == 0, err
    assert [r["call"] for r in json.loads(out)] == [first]
    code, out, err = await agentctl(settings, "llm", "show", first[:12], env={"COLUMNS": "200"})
    assert code == 0, err
    assert first in out and "sha256 matches" in out and "a todo app" in out and "product_manager says" in out
    code, out, err = await agentctl(settings, "llm", "show", "0" * 64)
    assert code == 2 and "no recorded call" in err, err
    # The run's recording, exported as a file a replay provider reads: each line a stored body.
    code, out, err = await agentctl(settings, "llm", "export", plan_id, "-o", str(settings.db_path.parent / "run.jsonl"))
    assert code == 0, err
    lines = (settings.db_path.parent / "run.jsonl").read_bytes().splitlines()
    assert [calls.call_hash(line) for line in lines] == [u.event.call for u in usages]  # type: ignore[union-attr]

    # --live, forked after the product manager: recorded up to the fork point, the model after it.
    pm_done = next(r.seq for r in records if r.key == f"{plan_id}-product_manager" and r.kind == "task_completed")
    fake.push(*[answer(f"{role} says: live") for role in ROLES[1:]])
    asked = len(fake.requests)
    code, live, err = await fork(settings, plan_id, pm_done, "--live")
    assert code == 0, (live, err)
    got = texts(live["output"]["outputs"])
    assert got["product_manager"] == original["output"]["outputs"]["product_manager"]["text"]
    assert [got[r] for r in ROLES[1:]] == [f"{r} says: live" for r in ROLES[1:]]
    assert len(fake.requests) == asked + 3
    records = await audit_records(js)
    asked_live = [r.event for r in records if r.kind == "task_usage" and r.accepted
                  and r.event.task_id.startswith(live["task_id"])]  # type: ignore[union-attr]
    assert [u.outcome for u in asked_live] == ["ok"] * 3 and all(u.call for u in asked_live)  # type: ignore[attr-defined]

    # The model goes away: a fork from the submission replays every call.
    fake.close()
    submitted = next(r.seq for r in records if r.key == plan_id and r.kind == "plan_submitted")
    code, forked, err = await fork(settings, plan_id, submitted)
    assert code == 0, (forked, err)
    assert forked["status"] == "completed" and forked["kept"] == [] and forked["calls"] == 4
    assert texts(forked["output"]["outputs"]) == texts(original["output"]["outputs"])
    new = forked["task_id"]
    records = await audit_records(js)
    replayed = [r.event for r in records if r.kind == "task_usage" and r.accepted
                and r.event.task_id.startswith(new)]  # type: ignore[union-attr]
    assert [u.outcome for u in replayed] == ["replayed"] * 4  # type: ignore[attr-defined]
    assert [u.call for u in replayed] == [u.event.call for u in usages]  # type: ignore[attr-defined,union-attr]
    [run_forked] = [r for r in records if r.kind == "run_forked" and r.key == new]
    assert (run_forked.event.source_task_id, run_forked.event.at_seq) == (plan_id, submitted)  # type: ignore[union-attr]
    assert run_forked.principal.startswith("cli-") and run_forked.seq < next(
        r.seq for r in records if r.key == new and r.kind == "plan_submitted")

    # Forked after the architect: the product manager and the architect are kept, the
    # developer and QA run again, from the recording.
    architect_done = next(r.seq for r in records if r.key == f"{plan_id}-architect" and r.kind == "task_completed")
    code, later, err = await fork(settings, plan_id, architect_done)
    assert code == 0, (later, err)
    assert sorted(later["kept"]) == [f"{plan_id}-architect", f"{plan_id}-product_manager"]
    assert texts(later["output"]["outputs"]) == texts(original["output"]["outputs"])
    records = await audit_records(js)
    ran = {r.key for r in records if r.kind == "task_completed" and r.key.startswith(later["task_id"] + "-")}
    assert ran == {f"{later['task_id']}-developer", f"{later['task_id']}-qa"}

    # The original is untouched, and shows its forks as branches; a fork says where it comes from.
    code, out, err = await agentctl(settings, "tasks", "show", plan_id, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert [f["task_id"] for f in shown["forks"]] == [live["task_id"], new, later["task_id"]]
    assert texts(shown["output"]["outputs"]) == texts(original["output"]["outputs"])
    code, out, err = await agentctl(settings, "tasks", "show", later["task_id"], env={"COLUMNS": "200"})
    assert code == 0, err
    assert f"forked from {plan_id} at seq {architect_done}" in out
    assert f"kept from {plan_id}-architect" in out

    # A fork from a point where the task had completed would keep everything: refused, saying so.
    code, refused, err = await fork(settings, plan_id, records[-1].seq)
    assert code == 3 and "had completed by seq" in err, (refused, err)


async def test_a_recorded_call_whose_body_was_changed_is_refused(
    connect_as: Callable[[str], Awaitable[Client]], procs: Procs
) -> None:
    await procs.start("router", "router")
    await wait_for_stream_ready((await connect_as("admin")).jetstream())
    js = (await connect_as("agent")).jetstream()
    body = b'{"not":"a call"}'
    name = await calls.store(js, body)
    assert name == hashlib.sha256(body).hexdigest()
    assert await calls.store(js, body) == name  # the same bytes again: harmless
    forged = hashlib.sha256(b"other").hexdigest()
    await js.publish(subjects.llm_call(forged), body, stream=subjects.LLMCALLS_STREAM)
    with pytest.raises(calls.CallCorrupt, match="does not match its hash"):
        await calls.fetch(js, forged)
    with pytest.raises(calls.CallCorrupt, match="not a call record"):
        await calls.fetch(js, name)
    with pytest.raises(calls.CallNotFound):
        await calls.fetch(js, "f" * 64)


async def wait_for_stream_ready(js: Any) -> None:
    from ledgerbus.bus.provision import wait_for_stream

    await wait_for_stream(js, subjects.LLMCALLS_STREAM, 20)


def test_a_recorded_call_redacts_secrets_and_keeps_its_request_hash() -> None:
    from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message

    request = ChatRequest(messages=[Message(role="user", content="deploy with AKIAIOSFODNN7EXAMPLE please")])
    result = ChatResult(text="ok", provider="p", model="m")
    record, body = calls.make(task_id="t", attempt=1, path="echo", n=1, skill="llm.chat", role="", agent="a",
                              request=request, request_sha256=calls.request_hash(request), result=result,
                              max_tokens=10, params={}, max_bytes=1 << 20)
    assert b"AKIAIOSFODNN7EXAMPLE" not in body and record.redacted
    assert record.request_hash == calls.request_hash(request)
    assert msgspec.json.decode(body, type=calls.CallRecord) == record

    big = ChatRequest(messages=[Message(role="user", content="x" * 5000)])
    record, body = calls.make(task_id="t", attempt=1, path="echo", n=1, skill="llm.chat", role="", agent="a",
                              request=big, request_sha256=calls.request_hash(big), result=result, max_tokens=10,
                              params={}, max_bytes=2000)
    assert len(body) <= 2000 and record.truncated == "request" and record.answer is not None
    assert record.request_hash == calls.request_hash(big)
    # An answer too large even without the request's text is dropped too, and cannot be replayed.
    long_answer = ChatResult(text="y" * 5000, provider="p", model="m")
    record, body = calls.make(task_id="t", attempt=1, path="echo", n=1, skill="llm.chat", role="", agent="a",
                              request=big, request_sha256=calls.request_hash(big), result=long_answer,
                              max_tokens=10, params={}, max_bytes=2000)
    assert len(body) <= 2000 and record.truncated == "answer" and record.answer is None
    with pytest.raises(ValueError, match="kept no answer"):
        record.result()


async def test_the_reason_loop_replays_its_wipe_when_stuck_and_keeps_a_subtask_done_before_the_fork_point(
    procs: Procs, admin: Client, settings: Settings, fake: FakeLLM  # noqa: F811
) -> None:
    from tests.test_llm_skills_e2e import phases

    stuck = [answer(data={"facts": []}), answer(data={"analysis": "no idea"}), answer(data={"actions": []}),
             answer(data={"done": False, "progress": 0.0, "feedback": "still nothing"})]
    fake.push(*stuck * 4, *phases(0.5))
    await start_system(procs, admin, ("thinker-1", "reason"), ("echo-1", "echo"))
    code, out, err = await agentctl(settings, "submit", "reason", "--input",
                                    json.dumps({"goal": "the impossible", "stuck_after": 2, "max_iterations": 6}),
                                    "--wait", "--json", timeout=60)
    original = json.loads(out)
    assert code == 1 and original["error"].startswith("stuck again"), (original, err)
    code, out, err = await agentctl(settings, "submit", "reason", "--input",
                                    json.dumps({"goal": "say hello loudly", "skills": ["echo"]}), "--wait", "--json",
                                    timeout=60)
    hello = json.loads(out)
    assert code == 0 and hello["output"]["answer"] == "HELLO", (hello, err)
    fake.close()
    js = admin.jetstream()
    records = await audit_records(js)

    # The loop that got stuck, wiped its working memory and got stuck again, forked in the
    # middle of its first iteration with no model: the same wipe, the same error.
    task_id = original["task_id"]
    thoughts = [r for r in records if r.kind == "memory_written" and r.accepted and r.key == "thinker-1"]
    at = thoughts[2].seq  # three phases of the first iteration written
    code, forked, err = await fork(settings, task_id, at)
    assert code == 1, (forked, err)
    assert forked["error"] == original["error"] and forked["memory_restored"] == ["thinker-1"], forked
    records = await audit_records(js)
    new = forked["task_id"]
    [wiped] = [r for r in records if r.kind == "memory_wiped" and r.accepted and task_id not in r.event.reason]  # type: ignore[union-attr]
    assert f"of task {new}" in wiped.event.reason  # type: ignore[union-attr]
    replayed = [r.event for r in records if r.kind == "task_usage" and r.accepted and r.event.task_id == new]  # type: ignore[union-attr]
    assert len(replayed) == 16 and {u.outcome for u in replayed} == {"replayed"}  # type: ignore[attr-defined]

    # The agent's memory went back to the fork point through a checkpoint, after one of it as it was.
    code, out, err = await agentctl(settings, "checkpoint", "list", "thinker-1", "--json")
    assert code == 0, err
    saved = {c["checkpoint_id"]: c for c in json.loads(out)}
    then, before = saved[f"fork-{new}-at-{at}"], saved[f"fork-{new}-before"]
    assert then["entries"] == 3 and then["restores"] == 1 and before["restores"] == 0
    assert next(r.seq for r in records if r.kind == "run_forked" and r.key == new) < before["seq"] < then["seq"]

    # A subtask done in the source run is kept when the forked loop submits it again.
    [echo] = [r for r in records if r.kind == "task_submitted" and r.event.skill == "echo"]  # type: ignore[union-attr]
    echoed = next(r.seq for r in records if r.key == echo.key and r.kind == "task_completed")
    code, forked, err = await fork(settings, hello["task_id"], echoed)
    assert code == 0, (forked, err)
    assert forked["output"] == hello["output"] and forked["kept"] == [echo.key]
    records = await audit_records(js)
    [again] = [r for r in records if r.kind == "task_submitted" and r.event.skill == "echo"  # type: ignore[union-attr]
               and r.event.parent_task_id == forked["task_id"]]  # type: ignore[union-attr]
    assert again.event.kept is not None and again.event.kept.source_task_id == echo.key  # type: ignore[union-attr]
    assert not [r for r in records if r.key == again.key and r.kind in ("task_started", "task_completed")], (
        "a kept subtask is not run again")


async def test_a_replay_provider_answers_from_a_recording_file_and_names_a_call_it_cannot(
        tmp_path: Path) -> None:
    from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message, ProviderError
    from ledgerbus.agents.llm.router import CallSite, LLMRouter
    from ledgerbus.bus.errors import ConfigError

    def recorded(path: str, n: int, prompt: str, text: str) -> bytes:
        request = ChatRequest(messages=[Message(role="user", content=prompt)])
        return calls.make(task_id="old", attempt=1, path=path, n=n, skill="llm.chat", role="", agent="a",
                          request=request, request_sha256=calls.request_hash(request),
                          result=ChatResult(text=text, provider="claude", model="claude-x"), max_tokens=10,
                          params={}, max_bytes=1 << 20)[1]

    (tmp_path / "run.jsonl").write_bytes(recorded("llm.chat", 1, "first", "one") + b"\n"
                                         + recorded("llm.chat", 2, "second", "two") + b"\n")
    routing = tmp_path / "llm.toml"
    routing.write_text('[providers.rec]\ntype = "replay"\nfile = "run.jsonl"\nmatch = "{match}"\n\n'
                       '[default]\nprovider = "rec"\nmodel = "recorded"\n'.replace("{match}", "lenient"))
    reported: list[Any] = []

    async def usage(u: Any) -> None:
        reported.append(u)

    async with LLMRouter.from_file(routing) as router:
        llm = router.bind("llm.chat", usage=usage, site=CallSite(task_id="new", path="llm.chat"))
        assert (await llm.chat("second")).text == "two"  # strict: the same request, whatever its number
        assert (await llm.chat("a prompt that embeds an id")).text == "two"  # lenient: call 2 at this path
        with pytest.raises(ProviderError, match="no recorded answer for call 3 of task path llm.chat") as miss:
            await llm.chat("third")
        assert "it has calls 1, 2 of that task" in str(miss.value)
    assert [u.outcome for u in reported] == ["replayed", "replayed"] and all(u.call for u in reported)

    routing.write_text(routing.read_text().replace('"lenient"', '"strict"'))
    async with LLMRouter.from_file(routing) as router:
        llm = router.bind("llm.chat", site=CallSite(task_id="new", path="llm.chat"))
        with pytest.raises(ProviderError, match="none with the same request hash; lenient matching would"):
            await llm.chat("first, reworded")

    routing.write_text('[providers.rec]\ntype = "replay"\nfile = "missing.jsonl"\n')
    with pytest.raises(ConfigError, match=r"providers.rec.file: .*missing.jsonl"):
        LLMRouter.from_file(routing)
    routing.write_text('[providers.rec]\ntype = "replay"\n')
    with pytest.raises(ConfigError, match="a replay provider needs file"):
        LLMRouter.from_file(routing)
    routing.write_text('[providers.rec]\ntype = "openai"\nbase_url = "http://x/v1"\nmatch = "strict"\n')
    with pytest.raises(ConfigError, match="only a replay provider takes match"):
        LLMRouter.from_file(routing)


async def test_an_answer_whose_recording_cannot_be_stored_is_kept_and_reported_without_a_hash(
        tmp_path: Path) -> None:
    import nats.errors
    from structlog.testing import capture_logs

    from ledgerbus.agents.llm.router import CallSite, LLMRouter

    routing = tmp_path / "llm.toml"
    routing.write_text('[providers.canned]\ntype = "scripted"\nanswers = ["paid for"]\n\n'
                       '[default]\nprovider = "canned"\nmodel = "m"\n')
    stored: list[bytes] = []
    reported: list[Any] = []

    async def broken(body: bytes) -> str:
        stored.append(body)
        raise nats.errors.TimeoutError

    async def usage(u: Any) -> None:
        reported.append(u)

    async with LLMRouter.from_file(routing) as router:
        llm = router.bind("llm.chat", usage=usage, site=CallSite(task_id="t", path="llm.chat", store=broken))
        with capture_logs() as logs:
            assert (await llm.chat("hello")).text == "paid for"
    assert len(stored) == 1 and [(u.outcome, u.call) for u in reported] == [("ok", "")]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["llm_provider_scripted", "llm_call_not_recorded"]
