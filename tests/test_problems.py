"""ledgerbus's words for a value that did not decode: one place reads msgspec's errors.

If a msgspec release changes its wording, these fail here, naming the shape that moved,
instead of every reason users and scripts read changing in silence.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import pytest

from ledgerbus.bus import codec
from ledgerbus.bus.errors import SchemaError
from ledgerbus.bus.problems import Problem, explain


class Shape(msgspec.Struct, forbid_unknown_fields=True):
    x: int
    bounded: Annotated[int, msgspec.Meta(ge=0)] = 0
    short: Annotated[str, msgspec.Meta(max_length=3)] = ""
    choice: Literal["p", "q"] = "p"
    items: list[int] = []
    nested: dict[str, "Shape"] = {}
    text: str = ""


class Tagged(msgspec.Struct, tag="yes", tag_field="kind"):
    a: int


def problem_of(data: bytes) -> Problem:
    with pytest.raises((msgspec.DecodeError, UnicodeDecodeError, RecursionError)) as caught:
        msgspec.json.decode(data, type=Tagged if b'"kind"' in data else Shape)
    return explain(caught.value)


@pytest.mark.parametrize(("data", "kind", "message", "path"), [
    (b'{"x":"a"}', "type", "expected int, got str", "$.x"),
    (b'{"x":1,"bounded":-1}', "bound", "expected int >= 0", "$.bounded"),
    (b'{"x":1,"short":"abcd"}', "bound", "expected str of length <= 3", "$.short"),
    (b'{}', "missing_field", "missing required field `x`", ""),
    (b'{"x":1,"nested":{"k":{}}}', "missing_field", "missing required field `x`", "$.nested[...]"),
    (b'{"x":1,"zz":2}', "unknown_field", "unknown field `zz`", ""),
    (b'{"x":1,"choice":"r"}', "bad_value", "not one of the allowed values: 'r'", "$.choice"),
    (b'{"kind":"nope","a":1}', "bad_value", "not one of the allowed values: 'nope'", "$.kind"),
    (b'{"x":1,"items":[1,"a"]}', "type", "expected int, got str", "$.items[1]"),
    (b'{"x":1e999}', "out_of_range", "number out of range", "$.x"),
    (b'{"x":1', "json", "not valid JSON: it ends too soon", ""),
    (b'{"x":1}x', "json", "not valid JSON (byte 8)", ""),
    (b'{"x":1,"text":"\xff\xfe"}', "utf8", "not valid UTF-8", ""),
])
def test_each_shape_of_msgspec_error_is_read_into_our_words(data: bytes, kind: str, message: str, path: str) -> None:
    problem = problem_of(data)
    assert (problem.kind, problem.message.split(" (byte")[0] if kind == "utf8" else problem.message,
            problem.path) == (kind, message, path)


def test_a_problem_reads_as_words_then_where() -> None:
    problem = Problem("type", "expected int, got str", "$.a.b")
    assert str(problem) == "expected int, got str - at `$.a.b`"
    assert problem.at("profiles.coder") == "expected int, got str - at `profiles.coder.a.b`"
    assert Problem("type", "m", "$[2]").at("t") == "m - at `t[2]`"
    assert Problem("unknown_field", "unknown field `z`").at("sandbox") == "unknown field `z` - at `sandbox`"
    assert Problem("json", "not valid JSON").at("") == "not valid JSON"


def test_an_error_of_another_shape_keeps_its_text_rather_than_losing_it() -> None:
    problem = explain(msgspec.ValidationError("Something new - at `$.q`"))
    assert problem == Problem("other", "Something new", "$.q")


def test_the_codec_raises_schema_errors_that_carry_the_problem() -> None:
    with pytest.raises(SchemaError) as caught:
        codec.decode_event(b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","timeout_s":"x"}')
    assert str(caught.value) == "expected float, got str - at `$.timeout_s`"
    assert caught.value.problem == Problem("type", "expected float, got str", "$.timeout_s")
