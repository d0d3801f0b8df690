"""Secret scanning: what it catches and what it leaves alone, measured on two corpora
(tests/secrets_corpus.py), and, through the real bus, that no secret a client sends
reaches AUDIT, WORK, the projection file or TRACES in clear."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import nats.js.errors
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from ledgerbus.bus import codec, redaction, subjects, tracing
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.settings import Settings
from tests.secrets_corpus import fakes, ordinary, wire
from tests.support import Procs, agentctl, stored_audit, wait_for_records, wait_until
from tests.test_e2e import projected, start_system

Connect = Callable[[str], Awaitable[Client]]

# AWS's own documentation pair, a password, and provider shapes (all made up).
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PASSWORD = "Tr0ub4dor&3-horse"
GH_TOKEN = "ghp_" + "R8d2Kq0Lw7Zx4Nf1Vb6Tm9Yc3Hs5Pa0Ej2Gu"
SLACK_TOKEN = "xoxb-190283746501-8Hq2LmZx0Rt4"
ANTHROPIC_KEY = "sk-ant-api03-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Jh1Gf0EdCbA-_x9Yz"


# --- the corpora ---------------------------------------------------------------------------


def test_ordinary_payloads_pass_untouched() -> None:
    corpus = ordinary()
    flagged = [(category, data, redaction.find(data)) for category, data in corpus if redaction.find(data)]
    sizes = Counter(category for category, _ in corpus)
    print(f"\nordinary corpus: {len(corpus)} messages, {sum(len(d) for _, d in corpus):,} bytes, "  # noqa: T201
          f"{len(flagged)} flagged ({len(flagged) / len(corpus):.2%}); by category {dict(sizes)}")
    assert not flagged, [(c, [(f.kind, d[max(0, f.start - 40):f.end]) for f in found]) for c, d, found in flagged]


def test_every_fake_secret_is_redacted_and_the_message_still_decodes() -> None:
    corpus = fakes()
    missed: list[tuple[str, str]] = []
    for fake in corpus:
        redacted, kinds = redaction.redact_bytes(wire(fake.payload))
        missed += [(fake.setting, s) for s in fake.secrets if s.encode() in redacted]
        assert set(kinds) & set(fake.kinds), (fake.setting, kinds)
        assert set(kinds) <= set(redaction.KINDS)
        codec.decode_event(redacted)  # still a valid submission: the secret is gone, not the message
    caught = len(corpus) - len({setting for setting, _ in missed})
    print(f"\nfake secrets: {len(corpus)} in {len({f.setting for f in corpus})} settings, "  # noqa: T201
          f"{caught} redacted ({caught / len(corpus):.1%})")
    assert not missed


def test_redacting_twice_finds_nothing_new() -> None:
    for fake in fakes()[::7]:
        once, _ = redaction.redact_bytes(wire(fake.payload))
        assert redaction.find(once) == [], once


# Pieces that make the rules fire, and the characters JSON escapes, mixed with any text.
_PIECES = st.sampled_from([
    "password", "Password", "api_key", "token", "secret", "Authorization", "=", ":", ": ", '"', "'", "\\", "\n",
    " ", ",", "Bearer ", "://u:", "@", "Tr0ub4dor&3x", "12345678901", AWS_ID, AWS_SECRET,
    "ghp_R8d2Kq0Lw7Zx4Nf1Vb6Tm9Yc3Hs5Pa0Ej2Gu", "-----BEGIN RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEA7bq",
    "-----END RSA PRIVATE KEY-----", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkw.c2lnbmF0dXJl",
])
_TEXTS = st.lists(_PIECES | st.text(max_size=8), max_size=12).map("".join)
_JSON = st.recursive(_TEXTS | st.integers(), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_TEXTS, inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_JSON)
# CI's run found it: an AWS secret's 40 characters matched from the n of a \n escape.
@example("AKIAIOSFODNN7EXAMPLE\nAKIAIOSFODNN7EXAMPLEMIIEowIBAAKCAQEA7bq")
@example(["AKIAIOSFODNN7EXAMPLE\\\u00e9AKIAIOSFODNN7EXAMPLEMIIEowIBAAKCAQEA7bq"])
def test_redacting_any_json_leaves_valid_json(value: object) -> None:
    redacted, _ = redaction.redact_bytes(codec.encode(value))
    msgspec.json.decode(redacted)


def test_digests_and_uuids_are_secrets_only_under_a_key_like_name() -> None:
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    uuid = "3f1c2a9e-7b4d-4e8a-9c1f-0d2e5b6a7c8d"
    plain = {"sha256": digest, "commit": digest[:40], "request_id": uuid, "id": new_id(), "blob": AWS_SECRET}
    assert redaction.find(wire(plain)) == []
    keyed, kinds = redaction.redact_bytes(wire({"client_secret": digest, "session_token": uuid}))
    assert digest.encode() not in keyed and uuid.encode() not in keyed and kinds == ["secret"]


@pytest.mark.parametrize(("text", "kept"), [
    ("password = getpass.getpass()", True),               # code, not a value
    ("credentials: GoogleCredentials | None = None", True),  # a type annotation
    ('{"password": "${DB_PASSWORD}", "token": "<token>"}', True),  # placeholders
    ('{"tokenizer": "cl100k_base", "max_tokens": 512, "secretName": "db-creds"}', True),
    ("https://user@example.com:8443/x?page=2", True),     # a URL without a password
    ("password: hunter2x", False),
    ("Authorization: Bearer Zx81kQm2Lp7Rt5Vw", False),
    ("mysql://root:s3cr3t-pw@db/app", False),
])
def test_the_name_rule_reads_code_placeholders_and_values_apart(text: str, kept: bool) -> None:
    assert (redaction.redact(text)[1] == []) is kept, redaction.redact(text)


def test_span_attributes_a_client_chose_are_redacted() -> None:
    attrs = tracing.messaging(f"in.cli.alice.{SLACK_TOKEN}", "process", GH_TOKEN, from_client=True)
    assert attrs["messaging.message.id"] == "[REDACTED:github-token]"
    assert attrs["messaging.destination.name"] == "in.cli.alice.[REDACTED:slack-token]"
    assert tracing.messaging("work.echo", "publish", "work-t1")["messaging.message.id"] == "work-t1"


# --- through the real bus ------------------------------------------------------------------


async def stored(js: JetStreamContext, stream: str) -> bytes:
    """Every message ``stream`` holds as stored, headers and body, concatenated (read by
    sequence: a work-queue stream takes no ordered consumer)."""
    state = (await js.stream_info(stream)).state
    out: list[bytes] = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue  # acked from a work queue
        out.append(json.dumps(msg.headers or {}).encode() + (msg.data or b""))
    return b"\n".join(out)


def assert_clean(where: str, data: bytes, *secrets: str) -> None:
    leaked = [s for s in secrets if s.encode() in data]
    assert not leaked, f"{where} holds {leaked} in clear"


async def test_an_aws_key_pair_and_a_password_reach_no_record_work_item_or_projection(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    await start_system(procs, admin, ("echo-1", "echo"))
    given = {
        "note": f"deploy with id {AWS_ID} and secret {AWS_SECRET}",
        "aws": {"access_key_id": AWS_ID, "secret_access_key": AWS_SECRET},
        "env": f"AWS_ACCESS_KEY_ID={AWS_ID}\nAWS_SECRET_ACCESS_KEY={AWS_SECRET}\n",
        "db": {"user": "app", "password": PASSWORD},
    }
    code, out, err = await agentctl(settings, "submit", "echo", "--input", json.dumps(given), "--wait", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "completed"
    assert result["output"]["db"] == {"user": "app", "password": "[REDACTED:password]"}
    assert_clean("the echoed output", out.encode(), AWS_ID, AWS_SECRET, PASSWORD)
    # No agent serves this skill: its work item stays in WORK to be read.
    code, out, err = await agentctl(settings, "submit", "unserved", "--input", json.dumps(given), "--json")
    assert code == 0, err
    js = admin.jetstream()
    await wait_until(lambda: _has_messages(js, subjects.WORK_STREAM), what="the unserved work item in WORK")

    work = await stored(js, subjects.WORK_STREAM)
    assert b"[REDACTED:aws-secret-access-key]" in work
    assert_clean("WORK", work, AWS_ID, AWS_SECRET, PASSWORD)
    records = b"".join(data for _, data in await stored_audit(js))
    assert records.count(b"[REDACTED:password]") >= 3  # the submission, the completion, the queued one
    assert_clean("AUDIT", records, AWS_ID, AWS_SECRET, PASSWORD)
    await projected(admin, result["task_id"])
    db_files = sorted(Path(settings.db_path).parent.glob(Path(settings.db_path).name + "*"))
    assert db_files
    assert_clean("the projection", b"".join(f.read_bytes() for f in db_files), AWS_ID, AWS_SECRET, PASSWORD)


async def _has_messages(js: JetStreamContext, stream: str) -> bool:
    return (await js.stream_info(stream)).state.messages > 0


async def test_a_secret_in_a_message_id_a_subject_or_a_field_name_reaches_no_span_or_record(
    procs: Procs, admin: Client, connect_as: Connect
) -> None:
    router = await procs.start("router", "router")  # tracing on, as it ships: spans go to TRACES
    cli = (await connect_as("cli")).jetstream()
    submission = TaskSubmitted(id=new_id(), task_id="traced-secret", skill="echo")
    await cli.publish("in.cli.alice.task_submitted", codec.encode(submission), headers={subjects.HDR_MSG_ID: GH_TOKEN})
    other = TaskSubmitted(id=new_id(), task_id="t2", skill="echo")
    await cli.publish(f"in.cli.alice.{SLACK_TOKEN}", codec.encode(other))
    field_named_by_a_key = b'{"kind":"task_submitted","id":"x1","task_id":"t3","skill":"echo","%s":1}'
    await cli.publish("in.cli.alice.task_submitted", field_named_by_a_key % ANTHROPIC_KEY.encode())
    accepted, mismatched, unknown_field = await wait_for_records(admin.jetstream(), 3)
    assert accepted.code == "ok" and mismatched.verdict == unknown_field.verdict == "rejected"
    assert "[REDACTED:anthropic-api-key]" in unknown_field.reason
    await router.stop()  # a stopping process flushes its spans to TRACES

    js = admin.jetstream()
    traces = await stored(js, subjects.TRACES_STREAM)
    assert b"router.process" in traces
    assert b'"messaging.message.id":"[REDACTED:github-token]"' in traces
    assert b"in.cli.alice.[REDACTED:slack-token]" in traces
    assert_clean("TRACES", traces, GH_TOKEN, SLACK_TOKEN, ANTHROPIC_KEY)
    assert_clean("AUDIT", await stored(js, subjects.AUDIT_STREAM), GH_TOKEN, SLACK_TOKEN,
                 ANTHROPIC_KEY)
