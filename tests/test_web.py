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

from ledgerbus.bus import tokens
from ledgerbus.bus.settings import Settings
from tests.support import Procs, agentctl
from tests.test_e2e import start_system

POLICY = '[approval]\nskills = ["sleep"]\napprovers = ["cli-ops"]\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for _ in range(200):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
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
        await http.post("/tasks", json={"skill": "sleep", "input": {"seconds": 0}, "task_id": "web-held"},
                        headers=as_tester)
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

        # A schema-driven fuzz run (schemathesis) finds no 500 and no answer its schema does not allow.
        fuzz = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "st"), "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {tester}",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance", "--max-examples", "3", "--generation-deterministic", "--phases", "coverage",
            "--request-timeout", "20", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        report, _ = await fuzz.communicate()
        assert fuzz.returncode == 0, report.decode()[-20000:]
        assert "Tested: 15" in report.decode() and "Coverage" in report.decode(), report.decode()[-3000:]

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
