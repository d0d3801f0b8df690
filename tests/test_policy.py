"""policy.toml: skills per principal, rate limits, secrets - enforced by the router, reloaded
without a restart, and never letting a secret into the audit log in clear."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from ledgerbus.router.policy import Policy, PolicyFile, RateLimit, load
from tests.conftest import RunningRouter
from tests.support import stored_audit, wait_for_records, work_count

Connect = Callable[[str], Awaitable[Client]]
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq\n-----END RSA PRIVATE KEY-----"


def test_the_most_specific_principal_pattern_wins() -> None:
    policy = Policy(skills={"cli-*": ["echo"], "cli-ops-*": ["*"], "cli-ops-bob": ["sleep"]},
                    rate_limits={"*": RateLimit(rate=1, burst=1), "cli-*": RateLimit(rate=5, burst=5)})
    assert policy.may_submit("cli-alice", "echo") and not policy.may_submit("cli-alice", "sleep")
    assert policy.may_submit("cli-ops-carol", "shell")
    assert policy.allowed_skills("cli-ops-bob") == ["sleep"]
    assert not policy.may_submit("agent-x", "echo")
    assert policy.rate_limit("cli-alice") == ("cli-*", RateLimit(rate=5, burst=5))
    assert policy.rate_limit("agent-x") == ("*", RateLimit(rate=1, burst=1))


def test_a_bad_policy_file_names_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[secrets]\naction = "shred"\n')
    with pytest.raises(ConfigError, match=r"policy .*policy.toml: .*\$\.secrets\.action"):
        load(path)
    with pytest.raises(ConfigError):
        PolicyFile(path)  # a broken policy stops the router at start


def test_a_policy_file_is_reloaded_when_it_changes_and_a_broken_edit_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    assert PolicyFile(path).current() == Policy()  # no file: built-in defaults
    path.write_text('[skills]\n"cli-*" = ["echo"]\n')
    policy = PolicyFile(path, check_every_s=0)
    assert policy.current().allowed_skills("cli-a") == ["echo"]
    path.write_text('[skills]\n"cli-*" = ["echo", "sleep"]\n')
    os.utime(path, ns=(1, 10**18))  # a different mtime even on a coarse clock
    assert policy.current().allowed_skills("cli-a") == ["echo", "sleep"]
    path.write_text("[skills\n")
    os.utime(path, ns=(1, 2 * 10**18))
    assert policy.current().allowed_skills("cli-a") == ["echo", "sleep"]
    path.unlink()
    assert policy.current().allowed_skills("cli-a") == ["echo", "sleep"], "deleting the file opens nothing"


def test_answers_worked_out_once_follow_a_reload(tmp_path: Path) -> None:
    # The router asks the same questions on every message and the policy remembers the
    # answers; a reloaded policy must answer afresh, not from the old one's memory.
    path = tmp_path / "policy.toml"
    path.write_text('[skills]\n"cli-*" = ["echo"]\n[approval]\nskills = []\n')
    policy = PolicyFile(path, check_every_s=0)
    for _ in range(2):  # the second time from memory
        assert policy.current().may_submit("cli-a", "echo") and not policy.current().may_submit("cli-a", "shell")
        assert not policy.current().needs_approval("shell") and policy.current().rate_limit("cli-a") is None
    path.write_text('[skills]\n"cli-*" = ["shell"]\n[approval]\nskills = ["sh*"]\n'
                    '[rate_limits]\n"cli-a" = { rate = 1, burst = 2 }\n')
    os.utime(path, ns=(1, 10**18))
    current = policy.current()
    assert not current.may_submit("cli-a", "echo") and current.may_submit("cli-a", "shell")
    assert current.needs_approval("shell")
    assert current.rate_limit("cli-a") == ("cli-a", current.rate_limits["cli-a"])


async def router_with(policy_text: str, settings: Settings, connect_as: Connect) -> RunningRouter:
    settings.policy_path.write_text(policy_text)
    router = RunningRouter(await connect_as("router"), settings)
    await router.start()
    return router


async def submit(cli: Client, skill: str = "echo", task_id: str | None = None, user: str = "alice",
                 **input: object) -> None:
    event = TaskSubmitted(id=new_id(), task_id=task_id or new_id(), skill=skill, input=dict(input))
    await cli.jetstream().publish(f"in.cli.{user}.task_submitted", codec.encode(event))


async def test_skills_follow_the_policy_and_an_edit_applies_without_a_restart(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    router = await router_with('[skills]\n"cli-*" = ["echo"]\n"cli-ops" = ["*"]\n', settings, connect_as)
    try:
        cli = await connect_as("cli")
        await submit(cli, "sleep")
        await submit(cli, "sleep", user="ops")
        denied, allowed = await wait_for_records(admin.jetstream(), 2)
        assert (denied.code, allowed.code) == ("skill_not_allowed", "ok")
        assert "cli-alice may not submit sleep (allowed: echo)" == denied.reason
        settings.policy_path.write_text('[skills]\n"cli-*" = ["echo", "sleep"]\n')
        os.utime(settings.policy_path, ns=(1, 10**18))
        await submit(cli, "sleep")
        *_, now_allowed = await wait_for_records(admin.jetstream(), 3)
        assert now_allowed.code == "ok"
        assert await work_count(admin.jetstream()) == 2
    finally:
        await router.stop()


async def test_a_burst_over_the_rate_limit_is_rejected_and_others_are_not_slowed(
    settings: Settings, connect_as: Connect, admin: Client
) -> None:
    router = await router_with('[rate_limits]\n"cli-alice" = { rate = 0.001, burst = 3 }\n', settings, connect_as)
    try:
        cli = await connect_as("cli")
        for _ in range(6):
            await submit(cli)
        await submit(cli, user="bob")
        records = await wait_for_records(admin.jetstream(), 7)
        assert [r.code for r in records] == ["ok"] * 3 + ["rate_limited"] * 3 + ["ok"]
        assert "0.001/s, burst 3" in records[3].reason
        assert await work_count(admin.jetstream()) == 4
    finally:
        await router.stop()


@pytest.mark.parametrize("action", ["redact", "reject"])
async def test_a_secret_never_reaches_the_audit_log_in_clear(
    settings: Settings, connect_as: Connect, admin: Client, action: str
) -> None:
    router = await router_with(f'[skills]\n"cli-*" = ["echo"]\n[secrets]\naction = "{action}"\n', settings,
                               connect_as)
    try:
        cli = await connect_as("cli")
        await submit(cli, task_id="with-key", note=f"use {AWS_KEY} please", pem=PEM)
        await submit(cli, "sleep", task_id="denied-with-key", key=AWS_KEY)  # rejected for its skill
        await cli.jetstream().publish("in.cli.alice.task_submitted", b"not json " + PEM.encode())
        await cli.jetstream().publish("in.cli.alice.task_submitted", codec.encode(  # where it cannot be redacted
            TaskSubmitted(id=AWS_KEY, task_id="key-as-id", skill="echo")), headers={subjects.HDR_MSG_ID: AWS_KEY})
        keyed, denied, garbage, as_id = await wait_for_records(admin.jetstream(), 4)
        stored = b"".join(data for _, data in await stored_audit(admin.jetstream()))
        assert AWS_KEY.encode() not in stored and b"MIIEowIBAAKCAQEA7bq" not in stored
        if action == "redact":
            assert (keyed.code, keyed.reason) == ("ok", "redacted: aws-access-key-id, private-key")
            assert keyed.event.input == {"note": "use [REDACTED:aws-access-key-id] please",  # type: ignore[union-attr]
                                         "pem": "[REDACTED:private-key]"}
            item = codec.decode_work((await admin.jetstream().get_msg(subjects.WORK_STREAM, seq=1)).data)
            assert AWS_KEY not in str(item.input)
        else:
            assert keyed.code == "secret_detected" and "aws-access-key-id" in keyed.reason
        assert denied.code == "skill_not_allowed" and denied.event.input == {  # type: ignore[union-attr]
            "key": "[REDACTED:aws-access-key-id]"}
        assert garbage.code == "schema" and "[REDACTED:private-key]" in garbage.raw.head  # type: ignore[union-attr]
        assert as_id.code == "secret_detected" and as_id.event is None
        assert await work_count(admin.jetstream()) == (1 if action == "redact" else 0)
    finally:
        await router.stop()


@pytest.mark.parametrize("secret", [
    PEM, AWS_KEY, "ASIAIOSFODNN7EXAMPLE", "sk-ant-api03-" + "a" * 30, "sk-proj-" + "b" * 30, "ghp_" + "c" * 36,
    "xoxb-" + "1" * 12, "AIza" + "d" * 35, "sk_live_" + "e" * 20,
])
def test_every_secret_shape_is_redacted(secret: str) -> None:
    from ledgerbus.router.checks.secrets import redact

    text, found = redact(codec.encode({"note": f"before {secret} after"}).decode())
    assert found and secret not in text and "before [REDACTED:" in text


def test_a_retention_value_that_does_not_parse_is_refused_naming_its_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[retention]\naudit_max_age = "7 days"\n')
    with pytest.raises(ConfigError, match=r"audit_max_age: '7 days' is not a duration.*retention"):
        load(path)
    path.write_text('[retention]\naudit_max_bytes = "10 gigs"\n')
    with pytest.raises(ConfigError, match=r"audit_max_bytes: '10 gigs' is not a size.*retention"):
        load(path)
    path.write_text('[retention]\naudit_max_age = "12h"\naudit_max_bytes = "512MiB"\n')
    rule = load(path).retention
    assert (rule.max_age_s, rule.max_bytes, rule.enabled) == (43200.0, 512 * 2**20, True)
