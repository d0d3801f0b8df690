"""The HTTP gateway (`agentctl web`) as a process on loopback, a real HTTP client, the real
bus behind it: tokens bound to principals, what each may do, bad input, server-sent events."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import httpx2 as httpx
from nats.aio.client import Client

from ledgerbus.bus import subjects, tokens
from ledgerbus.bus.settings import Settings
from tests.support import Procs, agentctl
from tests.test_e2e import start_system

POLICY = '[approval]\nskills = ["sleep"]\napprovers = ["cli-ops"]\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until_healthy(base: str) -> None:
    """Until the gateway at ``base`` answers ``/healthz``."""
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        for _ in range(300):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway at {base} did not start")


async def test_the_api_acts_as_the_tokens_principal_and_answers_errors_as_json(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    settings.policy_path.write_text(POLICY)
    await start_system(procs, admin, ("echo-1", "echo"), ("sleeper-1", "sleep"))
    code, out, err = await agentctl(settings, "keys", "token", "add", "tester", "--note", "ci", "--json")
    assert code == 0, err
    tester = json.loads(out)["token"]
    ops = tokens.issue(settings.auth_dir, "cli-ops")
    stored = (settings.auth_dir / tokens.TOKENS_FILE).read_text()
    assert tester not in stored and tokens.parse(tester)[1] not in stored  # only its hash, and a seal
    port = _free_port()
    await procs.start("web", "web", "--port", str(port))
    base = f"http://127.0.0.1:{port}"

    await wait_until_healthy(base)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        assert (await http.get("/readyz")).json() == {"ok": True}
        spec = (await http.get("/openapi.json")).json()
        assert {"/tasks", "/tasks/{task_id}", "/plans", "/agents", "/tasks/{task_id}/events"} <= set(spec["paths"])

        as_tester = {"Authorization": f"Bearer {tester}"}
        as_ops = {"Authorization": f"Bearer {ops}"}
        # No token, a malformed one, a forged one: 401, JSON, nothing sent.
        for headers in ({}, {"Authorization": "Basic x"}, {"Authorization": "Bearer lbt_nope_nope"},
                        {"Authorization": f"Bearer {tester[:-2]}xx"}):
            r = await http.post("/tasks", json={"skill": "echo"}, headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
            assert r.headers["www-authenticate"] == "Bearer"

        # Bad input: 422 naming the field, never a 500.
        r = await http.post("/tasks", json={"skill": 5}, headers=as_tester)
        assert r.status_code == 422 and r.json()["message"].startswith("body.skill:"), r.text
        r = await http.post("/tasks", json={"skill": "echo", "colour": "red"}, headers=as_tester)
        assert r.status_code == 422 and "body.colour" in r.json()["message"], r.text
        r = await http.post("/tasks", content=b"{not json", headers={**as_tester, "Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert (await http.get("/tasks", params={"limit": 0}, headers=as_tester)).status_code == 422

        # Submit, follow its events as they happen, read it back.
        r = await http.post("/tasks", json={"skill": "echo", "input": {"n": 1}, "task_id": "web-echo-1"},
                            headers=as_tester)
        assert r.status_code == 202 and r.json()["task_id"] == "web-echo-1", r.text
        assert r.json()["code"] == "ok" and r.json()["audit_seq"] > 0, r.text
        # Answered once the router has recorded it: a read right after knows the task.
        assert (await http.get("/tasks/web-echo-1", headers=as_tester)).status_code == 200
        # A submission the router refuses comes back refused, with the router's code.
        r = await http.post("/tasks", json={"skill": "echo", "task_id": "web-echo-1"}, headers=as_tester)
        assert r.status_code == 409 and r.json()["code"] == "duplicate_task", r.text
        assert r.json()["task_id"] == "web-echo-1" and r.json()["audit_seq"] > 0, r.text
        kinds = []
        async with http.stream("GET", "/tasks/web-echo-1/events", headers=as_tester) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            async for line in events.aiter_lines():
                if line.startswith("data: {") and line != "data: {}":
                    record = json.loads(line[6:])
                    kinds.append(record["kind"])
                    assert record["principal"] in ("cli-tester", "agent-echo-1")
        assert kinds[0] == "task_submitted" and kinds[-1] == "task_completed", kinds
        for _ in range(100):
            task = (await http.get("/tasks/web-ec", headers=as_tester)).json()  # a prefix will do
            if task.get("status") == "completed":
                break
            await asyncio.sleep(0.1)
        assert (task["task_id"], task["output"], task["submitted_by"]) == ("web-echo-1", {"n": 1}, "cli-tester")
        r = await http.get("/tasks/no-such-task", headers=as_tester)
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        page = (await http.get("/tasks", params={"skill": "echo"}, headers=as_tester)).json()
        assert [t["task_id"] for t in page["items"]] == ["web-echo-1"] and page["next"] is None

        # A held task: its submitter may not approve it; the approver's own token may.
        r = await http.post("/tasks", json={"skill": "sleep", "input": {"seconds": 0}, "task_id": "web-held"},
                            headers=as_tester)
        assert r.status_code == 202 and r.json()["code"] == "approval_requested", r.text
        for _ in range(100):
            held = await http.get("/approvals", headers=as_ops)  # 503 while the projector starts
            if held.status_code == 200 and [a["task_id"] for a in held.json()] == ["web-held"]:
                break
            await asyncio.sleep(0.1)
        r = await http.post("/tasks/web-held/approve", json={"reason": "mine"}, headers=as_tester)
        assert r.status_code == 409 and r.json()["code"] == "not_an_approver", r.text
        r = await http.post("/tasks/web-held/approve", json={"reason": "fine"}, headers=as_ops)
        assert r.status_code == 200 and (r.json()["principal"], r.json()["verdict"]) == ("cli-ops", "accepted"), r.text

        agents = {a["name"]: a for a in (await http.get("/agents", headers=as_ops)).json()}
        assert set(agents) == {"echo-1", "sleeper-1"} and agents["echo-1"]["replicas"] == 1
        audit = (await http.get("/audit", params={"from_seq": 1, "limit": 1000}, headers=as_ops)).json()
        decided = [r for r in audit if r["key"] == "web-held" and r["kind"] in ("task_submitted", "task_approved")]
        assert [(r["kind"], r["principal"], r["verdict"]) for r in decided] == [
            ("task_submitted", "cli-tester", "accepted"), ("task_approved", "cli-tester", "rejected"),
            ("task_approved", "cli-ops", "accepted")]
        assert [r["code"] for r in decided] == ["approval_requested", "not_an_approver", "ok"]

        await _the_control_centers_calls(http, as_tester, as_ops)

        # A schema-driven fuzz run (schemathesis) finds no 500 and no answer its schema does not allow.
        fuzz = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "st"), "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {tester}",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance", "--max-examples", "3", "--generation-deterministic", "--phases", "coverage",
            "--request-timeout", "20", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        report, _ = await fuzz.communicate()
        assert fuzz.returncode == 0, report.decode()[-20000:]
        operations = sum(len(methods) for methods in spec["paths"].values())
        assert f"Tested: {operations}" in report.decode() and "Coverage" in report.decode(), report.decode()[-3000:]

        # Revoked: refused from the next request on.
        code, _, err = await agentctl(settings, "keys", "token", "revoke", tokens.parse(ops)[0])
        assert code == 0, err
        r = await http.get("/agents", headers=as_ops)
        assert r.status_code == 401, r.text
        assert (await http.get("/agents", headers=as_tester)).status_code == 200


def test_a_token_opens_only_its_own_principals_credentials(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import msgspec
    import pytest

    from ledgerbus.bus.errors import ConfigError
    from ledgerbus.bus.identity import CREDS_DIR, Credentials

    (tmp_path / CREDS_DIR).mkdir()
    for name in ("alice", "bob"):
        creds = Credentials(f"cli-{name}", f"pw-{name}", f"_INBOX_cli-{name}")
        (tmp_path / CREDS_DIR / f"cli-{name}.json").write_bytes(msgspec.json.encode(creds))
    alice, bob = tokens.issue(tmp_path, "cli-alice"), tokens.issue(tmp_path, "cli-bob")
    found = tokens.load(tmp_path)
    opened = tokens.open_token(found, alice)
    assert opened is not None and (opened[0].principal, opened[1].password) == ("cli-alice", "pw-alice")
    alice_id, alice_secret = tokens.parse(alice)
    bob_id, bob_secret = tokens.parse(bob)
    # Another token's secret under this id, a guessed one, a malformed one: nothing opens.
    for wrong in (f"lbt_{alice_id}_{bob_secret}", f"lbt_{alice_id}_x", "lbt_", "Bearer", f"{alice}x"):
        assert tokens.open_token(found, wrong) is None, wrong
    # A seal moved from one entry to another (or altered) does not open either.
    moved = {**found, alice_id: msgspec.structs.replace(found[alice_id], sealed=found[bob_id].sealed)}
    assert tokens.open_token(moved, alice) is None
    with pytest.raises(ConfigError, match="CLI principal"):
        tokens.issue(tmp_path, "agent-x")
    with pytest.raises(ConfigError, match="no credentials for cli-carol"):
        tokens.issue(tmp_path, "cli-carol")
    assert tokens.revoke(tmp_path, alice) is not None and tokens.open_token(tokens.load(tmp_path), alice) is None
    assert tokens.open_token(tokens.load(tmp_path), bob) is not None


async def _the_control_centers_calls(http: httpx.AsyncClient, as_tester: dict[str, str], as_ops: dict[str, str]) -> None:
    """The calls the control center makes beyond the client's: who am I, skills, plan
    checks, top-level lists, traces, the audit log newest first and filtered, verify,
    and an agent's memory checkpointed, wiped and restored."""
    assert (await http.get("/me", headers=as_tester)).json() == {"principal": "cli-tester", "name": "tester"}
    skills = {s["name"]: s for s in (await http.get("/skills", headers=as_tester)).json()}
    assert {"echo", "sleep"} <= set(skills)
    assert "seconds" in skills["sleep"]["input"]["$defs"]["SleepInput"]["properties"]

    text = "steps:\n  - {id: a, skill: echo, input: {n: 1}}\n  - {id: b, skill: echo, deps: [a]}\n"
    plan = (await http.post("/plans/check", json={"text": text}, headers=as_tester)).json()
    assert [(s["id"], s["deps"]) for s in plan["steps"]] == [("a", []), ("b", ["a"])] and "task_id" not in plan
    for bad, says in (("steps:\n  - {id: a, skill: echo, deps: [nope]}\n", "nope"), ("steps: [\n", "not valid YAML"),
                      ("- just a list\n", "a plan is a mapping")):
        r = await http.post("/plans/check", json={"text": bad}, headers=as_tester)
        assert r.status_code == 422 and r.json()["code"] == "invalid_plan" and says in r.json()["message"], r.text

    r = await http.post("/plans", json={**plan, "task_id": "web-plan"}, headers=as_tester)
    assert r.status_code == 202 and r.json()["code"] == "ok" and r.json()["audit_seq"] > 0, r.text
    r = await http.post("/plans", json={**plan, "task_id": "web-plan"}, headers=as_tester)  # refused: answered so
    assert r.status_code == 409 and r.json()["code"] == "duplicate_task", r.text
    for _ in range(100):
        got = (await http.get("/tasks/web-plan", headers=as_tester)).json()
        if got.get("status") == "completed":
            break
        await asyncio.sleep(0.1)
    assert [(c["step"], c["status"]) for c in got["children"]] == [("a", "completed"), ("b", "completed")], got
    top = [t["task_id"] for t in (await http.get("/tasks", params={"top_level": True}, headers=as_tester)).json()["items"]]
    assert "web-plan" in top and not any(t.startswith("web-plan-") for t in top), top
    steps = (await http.get("/tasks", params={"parent": "web-plan"}, headers=as_tester)).json()["items"]
    assert sorted(t["step"] for t in steps) == ["a", "b"]

    for _ in range(100):  # spans reach TRACES in batches, a quarter of a second apart
        trace = (await http.get("/tasks/web-plan/trace", headers=as_tester)).json()
        names = {(s["name"], s["service"]) for s in trace["spans"]}
        hops = {("web.submit", "ledgerbus-web"), ("router.process", "ledgerbus-router"),
                ("agent.run", "ledgerbus-agent-echo-1"), ("projector.apply", "ledgerbus-projector")}
        if hops <= names:
            break
        await asyncio.sleep(0.1)
    assert hops <= names, names
    assert trace["spans"][0]["depth"] == 0 and any(s["critical"] for s in trace["spans"])
    assert all(s["depth"] == 0 or s["parent_span_id"] for s in trace["spans"])

    newest = (await http.get("/audit", params={"order": "desc", "limit": 3}, headers=as_ops)).json()
    seqs = [r["seq"] for r in newest]
    assert seqs == sorted(seqs, reverse=True) and seqs[0] - seqs[-1] == 2, seqs
    older = (await http.get("/audit", params={"order": "desc", "limit": 2, "before": seqs[-1]}, headers=as_ops)).json()
    assert [r["seq"] for r in older] == [seqs[-1] - 1, seqs[-1] - 2]
    done = (await http.get("/audit", params={"order": "desc", "kind": "task_completed", "key": "web-plan",
                                             "limit": 10}, headers=as_ops)).json()
    assert [(r["kind"], r["key"]) for r in done] == [("task_completed", "web-plan")]  # its steps are keys of their own
    r = await http.get("/audit", params={"key": "web-pl"}, headers=as_ops)  # web-plan, web-plan-a, web-plan-b
    assert r.status_code == 404 and "ambiguous" in r.json()["message"], r.text
    mine = (await http.get("/audit", params={"principal": "cli-tester", "verdict": "rejected", "limit": 1000},
                           headers=as_ops)).json()
    assert mine and all((r["principal"], r["verdict"]) == ("cli-tester", "rejected") for r in mine)
    r = await http.get("/audit", params={"kind": "Not A Kind"}, headers=as_ops)
    assert r.status_code == 422 and r.json()["message"].startswith("query.kind"), r.text

    verdict = (await http.get("/audit/verify", headers=as_ops)).json()
    assert verdict["ok"] is True, verdict
    assert {c["check"] for c in verdict["checks"]} >= {"hash chain", "contiguity", "projections"}

    saved = await http.post("/agents/echo-1/checkpoints", json={"label": "calm", "checkpoint_id": "web-cp"},
                            headers=as_ops)
    assert saved.status_code == 200 and saved.json()["event"]["checkpoint_id"] == "web-cp", saved.text
    wiped = await http.post("/agents/echo-1/memory/wipe", json={"reason": "stuck"}, headers=as_ops)
    assert wiped.status_code == 200 and (wiped.json()["kind"], wiped.json()["principal"]) == ("memory_wiped", "cli-ops")
    restored = await http.post("/agents/echo-1/checkpoints/web-cp/restore", headers=as_ops)
    assert restored.status_code == 200 and restored.json()["kind"] == "checkpoint_restored", restored.text
    r = await http.post("/agents/echo-1/checkpoints/no-such-cp/restore", headers=as_ops)
    assert r.status_code == 409 and r.json()["audit_seq"] > restored.json()["seq"], r.text  # refused, and audited
    for _ in range(100):
        points = (await http.get("/agents/echo-1/checkpoints", headers=as_ops)).json()
        if points and points[0]["restores"] == 1:
            break
        await asyncio.sleep(0.1)
    assert [(p["checkpoint_id"], p["label"], p["restores"]) for p in points] == [("web-cp", "calm", 1)]


async def test_a_submission_no_router_decides_is_answered_after_the_wait_and_kept(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    """With no router running the gateway does not hang: after ``VERDICT_WAIT_S`` (5 s) it
    answers 202 without a verdict, and INGRESS keeps the submission for a router."""
    tester = tokens.issue(settings.auth_dir, "cli-tester")
    port = _free_port()
    await procs.start("web", "web", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    await wait_until_healthy(base)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        r = await http.post("/tasks", json={"skill": "echo", "task_id": "web-later"},
                            headers={"Authorization": f"Bearer {tester}"})
    assert r.status_code == 202, r.text
    assert (r.json()["task_id"], r.json()["audit_seq"], r.json()["code"]) == ("web-later", None, ""), r.text
    assert (await admin.jetstream().stream_info(subjects.INGRESS_STREAM)).state.messages == 1
