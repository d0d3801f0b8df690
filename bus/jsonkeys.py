"""Duplicate keys in JSON objects: found exactly, at any depth, named by their JSON path.

JSON leaves a repeated key undefined, and parsers disagree: msgspec (and Python's ``json``)
keep the last value, others keep the first or refuse. A body that names ``"skill"`` twice
would run one skill while a log viewer, a policy engine or an auditor's script reading the
raw bytes saw the other: a parser differential. The router refuses such bodies at ingress.

:func:`duplicate_key` expects a body that a strict JSON decoder (msgspec) has accepted:
well-formed UTF-8 JSON. On anything else it may answer either way, but never raises.

Cost, measured with ``timeit`` (best of 5; CPython 3.11, msgspec 0.23, a shared and busy
2-core machine), beside the strict typed decode the router does anyway and beside
``json.loads`` with an ``object_pairs_hook`` that compares ``len(dict(pairs))``:

=====================================  ===========  ================  ==================
clean body                             this check   msgspec (typed)   json + pairs hook
=====================================  ===========  ================  ==================
task_submitted, 320 bytes              ~3 us        ~2.5 us           ~8 us
20 KB input: 220 small objects         ~150 us      ~80 us            ~370 us
20 KB input: one long text             ~45 us       ~8 us             ~22 us
=====================================  ===========  ================  ==================

A body that does repeat a key also pays :func:`find`: ~25-45 us at 300 bytes, and at the
worst, 256 KB (``max_message_bytes``) of 32,000 one-key objects, ~60 ms (its typed
decode: ~6 ms). Only a body that is rejected pays that.
"""

from __future__ import annotations

import json
import re

import msgspec

# The tokens that matter for nesting, keys and array positions: strings (escapes included,
# unrolled so that a run of plain bytes is one C loop) and brackets and commas. Numbers,
# literals, colons and whitespace fall between matches. In well-formed JSON every '"'
# outside a string opens one, so a left-to-right scan never falls out of step.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],]', re.DOTALL)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_KEY_SHOWN = 64
_MAX_PATH = 256
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def duplicate_key(data: bytes) -> str | None:
    """The JSON path of the first key that repeats within its object, at any depth
    (``$.input.items[2].name``), or ``None`` when every object names each key once.

    Keys are compared as decoders see them, after unescaping: ``"skill"`` and
    ``"\\u0073kill"`` are one key.
    """
    if not _may_repeat(data):
        return None
    return find(data)


def _may_repeat(data: bytes) -> bool:
    """``False`` only when no object in ``data`` repeats a key; cheap, all in C.

    A decoder keeps one entry per distinct key, so a body has a duplicate exactly when
    its decoded tree holds fewer keys (and perhaps fewer strings) than its text names.
    Count colons: outside strings each one follows a key, inside strings each is a
    colon of the text. Re-encoded by msgspec (which writes a colon as itself), a clean
    tree has exactly the colons of the text, plus one per colon the text spelled as an
    escape (``\\u003a``); a tree that lost a duplicate has at least one fewer, since it
    lost that key and everything in the value it dropped, and gained nothing. Counting
    every ``\\u003a`` in the text as an escaped colon can only overestimate (the text
    ``\\\\u003a`` is a backslash and five letters), which costs a needless :func:`find`,
    never a missed duplicate.
    """
    try:
        again = _encoder.encode(_decoder.decode(data))
    except (msgspec.MsgspecError, RecursionError, UnicodeError):
        return True  # not what a strict decoder accepts: let the exact scan answer
    colons = data.count(b":")
    if b"\\u003" in data:  # one search in the common case, not two counts
        colons += data.count(b"\\u003a") + data.count(b"\\u003A")
    return again.count(b":") != colons


class _Frame:
    """One open container in :func:`find`'s scan."""

    __slots__ = ("keys", "at", "expect_key")

    def __init__(self, keys: set[str] | None) -> None:
        self.keys = keys  # the keys seen so far in an object; None for an array
        self.at: str | int = "" if keys is not None else 0  # current key, or array index
        self.expect_key = keys is not None  # the next string in an object is a key


def find(data: bytes) -> str | None:
    """The JSON path of the first key that repeats within its object (``$.input.items[2].name``),
    or ``None``. Exact, but a Python loop per token: :func:`duplicate_key` calls it only
    when the cheap count says a duplicate is possible.

    Iterative, so it follows any depth the decoder accepted.
    """
    stack: list[_Frame] = []
    top: _Frame | None = None  # stack[-1], kept at hand: this loop is the slow path's cost
    for token in _TOKEN.findall(data):
        first = token[0]
        if first == 0x22:  # '"'
            if top is None or not top.expect_key:
                continue  # a value, not a key
            assert top.keys is not None  # only an object expects a key
            key = _unescape(token)
            top.at, top.expect_key = key, False
            if key in top.keys:
                return _path(stack)
            top.keys.add(key)
        elif first == 0x2C:  # ','
            if top is None:
                continue
            if top.keys is None:
                top.at = int(top.at) + 1
            else:
                top.expect_key = True
        elif first == 0x7B or first == 0x5B:  # '{' or '['
            top = _Frame(set() if first == 0x7B else None)
            stack.append(top)
        elif stack:  # '}' or ']'
            stack.pop()
            top = stack[-1] if stack else None
    return None


def _unescape(token: bytes) -> str:
    """A key's text as decoders see it: only a key with an escape needs a JSON decode."""
    if b"\\" not in token:
        return token[1:-1].decode("utf-8", errors="replace")
    try:
        value = json.loads(token)
    except ValueError:
        # Not JSON after all (so not what the decoder accepted): keep the raw text.
        return token[1:-1].decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def _path(stack: list[_Frame]) -> str:
    """``$`` and one step per open container, in JSONPath's notation.

    The path goes into an audit record's reason, so it is bounded: a key is cut after
    ``_MAX_KEY_SHOWN`` characters, and a path deeper than ``_MAX_PATH`` characters keeps
    its innermost steps. Keys are shown ASCII-escaped (a lone surrogate, legal in JSON
    text, cannot be encoded as UTF-8), so a bare '…' can only mean a cut.
    """
    steps: list[str] = []
    for frame in stack:
        if frame.keys is None:
            steps.append(f"[{frame.at}]")
            continue
        key = str(frame.at)
        if len(key) > _MAX_KEY_SHOWN:
            steps.append(f'["{json.dumps(key[:_MAX_KEY_SHOWN])[1:-1]}…"]')
        elif _IDENTIFIER.fullmatch(key):
            steps.append(f".{key}")
        else:
            steps.append(f"[{json.dumps(key)}]")
    kept, size = len(steps), 0
    while kept > 0 and size + len(steps[kept - 1]) <= _MAX_PATH:
        kept -= 1
        size += len(steps[kept])
    return ("$" if kept == 0 else "$…") + "".join(steps[kept:])
