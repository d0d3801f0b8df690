"""Duplicate JSON keys: found at any depth and under any escaping, named by their path, and
refused by the router at ingress as ``invalid_json`` (a parser differential otherwise:
msgspec keeps the last key, a reader of the raw bytes may see the first)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from ledgerbus.bus import codec, jsonkeys, subjects
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.router.checks import Inbound, Rejection, schema
from ledgerbus.router.state import RouterState
from tests.conftest import RunningRouter
from tests.support import wait_for_records, work_count

Connect = Callable[[str], Awaitable[Client]]

HEAD = b'{"kind":"task_submitted","id":"m1","task_id":"t1",'


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"a":1,"a":2}', "$.a"),
        (HEAD + b'"skill":"echo","input":{},"skill":"sleep"}', "$.skill"),
        (HEAD + b'"skill":"echo","input":{"a":1,"b":{"c":1},"a":2}}', "$.input.a"),
        (HEAD + b'"skill":"echo","input":{"items":[{"name":1},{},{"x":[1,{"n":2}],"name":3,"name":4}]}}',
         "$.input.items[2].name"),
        (HEAD + b'"skill":"echo","input":{"m":[[],[1,[2,{"k":1,"k":1}]]]}}', "$.input.m[1][1][1].k"),
        (b'[{"a":1},[{"b":{"c":[0,0,{"d":1,"d":1}]}}]]', "$[1][0].b.c[2].d"),
        # Pretty-printed, whitespace around every colon and comma.
        (b'{\n  "a" : 1 ,\r\n\t"a"\n:\n2\n}', "$.a"),
        # Keys that are not identifiers are quoted in the path.
        (b'{"x":{"a b":1,"a b":2}}', '$.x["a b"]'),
    ],
)
def test_a_repeated_key_is_found_at_any_depth_and_named_by_its_path(body: bytes, path: str) -> None:
    assert jsonkeys.duplicate_key(body) == path


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"skill":"echo","\\u0073kill":"sleep"}', "$.skill"),
        (b'{"\\u0073\\u006B\\u0069ll":1,"skill":2}', "$.skill"),
        (b'{"a\\"b":1,"a\\u0022b":2}', '$["a\\"b"]'),
        (b'{"a\\\\":1,"a\\u005c":2}', '$["a\\\\"]'),
        (b'{"\\/":1,"/":2}', '$["/"]'),
        # A colon spelled as an escape: the fast count must not be fooled by it.
        (b'{"a:":1,"a\\u003a":2}', '$["a:"]'),
        (b'{"a\\u003A":1,"a:":2}', '$["a:"]'),
        # A surrogate pair and the character it spells.
        ('{"\\ud83d\\ude00":1,"\U0001f600":2}'.encode(), '$["\\ud83d\\ude00"]'),
    ],
)
def test_keys_equal_after_unescaping_are_duplicates(body: bytes, path: str) -> None:
    assert jsonkeys.duplicate_key(body) == path


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"b":2}',
        b'{"a":{"a":{"a":1}},"b":[{"a":1},{"a":2},{"a":3}]}',
        b'[{"a":1},{"a":1}]',
        # Strings that look like keys, or like the end of one.
        b'{"a":"\\",\\"a\\":1","b":"{\\"b\\":2}"}',
        b'{"a{\\"b\\":1,\\"b\\":2}":1,"b":"a"}',
        b'{"x":"\\\\","x2":"\\\\\\"","x3":":::"}',
        b'{"k":"\\"k\\":\\"k\\":"}',
        # Escaped colons without a duplicate, and a backslash followed by the letters u003a.
        b'{"a\\u003a":1,"a":2,"t":"12\\u003a30"}',
        b'{"a":"\\\\u003a","a\\\\u003a":1,"a:":2}',
        # Keys that differ only in case, whitespace or normalisation are different keys.
        b'{"a":1,"A":2,"a ":3," a":4}',
        '{"\u00e9":1,"e\u0301":2}'.encode(),
        b"[]",
        b"{}",
        b'"just a string: with a colon"',
    ],
)
def test_valid_bodies_have_no_duplicate(body: bytes) -> None:
    assert jsonkeys.duplicate_key(body) is None


def test_a_valid_body_never_pays_for_the_exact_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-token scan is for bodies that have a duplicate; every other body must be
    cleared by the C-speed count, or the router pays ~20x on every message."""
    scanned: list[bytes] = []
    monkeypatch.setattr(jsonkeys, "find", scanned.append)
    items = [{"name": f"n{i}", "note": 'a: "b" {c}', "ok": True, "at": "12:30:00"} for i in range(200)]
    bodies = [
        codec.encode(TaskSubmitted(id=new_id(), task_id=new_id(), skill="echo", input={"items": items})),
        json.dumps({"kind": "task_submitted", "input": {"s": "é: \u2603", "k": items[:3]}}, indent=2).encode(),
        json.dumps({"kind": "task_submitted", "input": {"é:": "é\\:"}}, ensure_ascii=True).encode(),
        b'{"a\\u003a":1,"a":2,"t":"12\\u003a30"}',
    ]
    for body in bodies:
        assert jsonkeys.duplicate_key(body) is None
    assert scanned == []


def test_a_huge_key_is_cut_short_in_the_path() -> None:
    key = "k" * 10_000
    path = jsonkeys.duplicate_key(json.dumps({"x": 1}).replace('"x"', f'"{key}":0,"{key}"').encode())
    assert path == '$["' + "k" * 64 + '…"]'


def test_a_deep_path_keeps_its_innermost_steps() -> None:
    depth = 900  # about as deep as msgspec decodes
    body = b'{"a":[' * depth + b'{"d":1,"d":2}' + b"]}" * depth
    path = jsonkeys.duplicate_key(body)
    assert path is not None and path.startswith("$…") and path.endswith(".a[0].a[0].d") and len(path) <= 260


def test_a_duplicate_deeper_than_python_recursion_is_found_without_a_crash() -> None:
    depth = 5_000
    body = b'{"a":' * depth + b'{"d":1,"d":2}' + b"}" * depth
    path = jsonkeys.duplicate_key(body)
    assert path is not None and path.endswith(".a.a.d")


# Keys from a tiny alphabet (so that objects repeat keys often) that includes everything
# that can fool a scanner: quotes, backslashes, colons, braces, non-ASCII. Any string may
# be spelled with every character escaped, so one key comes in several spellings.
_ALPHABET = 'ab:"\\{}[],é/ '
_STRINGS = st.tuples(st.just("str"), st.text(alphabet=_ALPHABET, max_size=4), st.booleans())
_JSON = st.recursive(
    _STRINGS | st.tuples(st.just("lit"), st.none() | st.booleans() | st.integers()),
    lambda inner: st.tuples(st.just("list"), st.lists(inner, max_size=4))
    | st.tuples(st.just("obj"), st.lists(st.tuples(_STRINGS, inner), max_size=4)),
    max_leaves=20,
)


def _render(value: Any, ascii_only: bool, spaced: bool) -> str:
    """JSON text of a drawn value; its objects may repeat keys, in any spelling."""
    colon, comma = (" : ", " , ") if spaced else (":", ",")
    match value:
        case ("str", text, True):
            return '"' + "".join(f"\\u{ord(c):04x}" for c in text) + '"'
        case ("str", text, False):
            return json.dumps(text, ensure_ascii=ascii_only)
        case ("lit", literal):
            return json.dumps(literal)
        case ("list", items):
            return "[" + comma.join(_render(v, ascii_only, spaced) for v in items) + "]"
        case ("obj", pairs):
            return "{" + comma.join(_render(k, ascii_only, spaced) + colon + _render(v, ascii_only, spaced)
                                    for k, v in pairs) + "}"
    raise AssertionError(value)


def _has_duplicate(text: str) -> bool:
    """The reference answer: Python's own parser, looking at every object's pairs."""
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in items}) != len(items)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return found


@settings(max_examples=400, deadline=None)
@given(_JSON, st.booleans(), st.booleans())
def test_the_detector_agrees_with_a_reference_parser_on_any_json(value: Any, ascii_only: bool, spaced: bool) -> None:
    text = _render(value, ascii_only, spaced)
    assert (jsonkeys.duplicate_key(text.encode()) is not None) == _has_duplicate(text), text


def _inbound(body: bytes) -> Inbound:
    return Inbound(subject="in.cli.alice.task_submitted", data=body, headers={}, ingress_seq=1, delivery=1)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"kind":"task_submitted","id":"\xff\xfe","id":"m"}', "schema"),
        (b'{"kind":"task_submitted","id":"m","id":', "schema"),
        (HEAD + b'"skill":"echo","skill":"sleep","bogus":1}', "schema"),
        (HEAD + b'"skill":"echo","skill":"sleep"}', "invalid_json"),
    ],
)
def test_the_schema_check_keeps_its_code_for_bodies_that_do_not_decode(body: bytes, code: str) -> None:
    msg = _inbound(body)
    rejection = schema.check(msg, RouterState())
    assert isinstance(rejection, Rejection) and rejection.code == code
    assert msg.event is None


def test_a_secret_used_as_a_key_is_redacted_from_the_reason() -> None:
    secret = "sk-ant-api03-" + "x" * 40
    body = HEAD + f'"skill":"echo","input":{{"{secret}":1,"{secret}":2}}}}'.encode()
    rejection = schema.check(_inbound(body), RouterState())
    assert isinstance(rejection, Rejection) and rejection.code == "invalid_json"
    assert secret not in rejection.reason and "REDACTED" in rejection.reason


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"kind":"task_submitted","id":"%s","task_id":"dup","skill":"echo","input":{"seconds":0},"skill":"sleep"}',
         "$.skill"),
        (b'{"kind":"task_submitted","id":"%s","task_id":"dup","skill":"echo",'
         b'"input":{"items":[{"name":"a"},{"name":"b"},{"name":"c","name":"d"}]}}',
         "$.input.items[2].name"),
    ],
)
async def test_the_router_rejects_a_duplicate_key_with_one_record_and_keeps_serving(
    running_router: RunningRouter, connect_as: Connect, admin: Client, body: bytes, path: str
) -> None:
    cli = await connect_as("cli")
    js = cli.jetstream()
    body = body % new_id().encode()
    await js.publish(subjects.ingress(subjects.principal("cli", "alice"), "task_submitted"), body)
    after = TaskSubmitted(id=new_id(), task_id="after", skill="echo")
    await js.publish(subjects.ingress(subjects.principal("cli", "alice"), "task_submitted"), codec.encode(after))

    records = await wait_for_records(admin.jetstream(), 2)
    assert len(records) == 2, "one record for the refused message, one for the next"
    bad, good = records
    assert (bad.verdict, bad.code, bad.principal) == ("rejected", "invalid_json", "cli-alice")
    assert path in bad.reason
    assert [r for r in records if path in r.reason] == [bad]
    # Recorded as the bytes that came in, not as either reading of them.
    assert bad.event is None and bad.raw is not None and bad.raw.size == len(body)
    assert good.accepted and good.key == "after"
    # Only the valid message reached WORK, and it is the one that followed.
    assert await work_count(admin.jetstream()) == 1
    item = codec.decode_work((await admin.jetstream().get_msg(subjects.WORK_STREAM, seq=1)).data)
    assert (item.task_id, item.skill) == ("after", "echo")
