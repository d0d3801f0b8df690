"""What was wrong with a message or a file, in ledgerbus's own words.

msgspec's error texts are its own and change between releases (0.23 turned "invalid UTF-8"
into "Invalid UTF-8 encoded string"). Everything ledgerbus tells a person about a value
that did not decode or validate (a rejected message's audit reason, a skill's bad input, a
config file's mistake) goes through :func:`explain`, which reads msgspec's error once, at
this boundary, into a :class:`Problem`: what kind of mistake, where, and the words for it.
A change of wording upstream then breaks one test of this module, not the reasons users
and scripts see.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import msgspec

# The shapes of msgspec's messages (checked against the locked release by tests/test_problems.py).
_AT = re.compile(r"^(?P<text>.*?) - at `(?P<path>[^`]*)`$", re.DOTALL)
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`(?:, got `(?P<got>[^`]+)`)?(?P<bound>.*)$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]+)`$")
_ENUM = re.compile(r"^Invalid (?:enum )?value (?P<value>'.+)$", re.DOTALL)
_MALFORMED = re.compile(r"^JSON is malformed: (?P<why>.*)$", re.DOTALL)
_BYTE = re.compile(r"\(byte (\d+)\)")


class Problem(NamedTuple):
    """One thing wrong with a value: ``kind`` for machines, ``message`` for people, and
    ``path`` (``$.input.seconds``; empty for the whole value) to find it."""

    kind: str
    """``type``, ``bound``, ``missing_field``, ``unknown_field``, ``bad_value``,
    ``out_of_range``, ``utf8``, ``json``, ``too_deep`` or ``other``."""
    message: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.message} - at `{self.path}`" if self.path else self.message

    def at(self, root: str) -> str:
        """The same words with the path rooted at ``root`` instead of ``$`` (a file's
        table, ``profiles.coder``), for errors about a part of a larger document."""
        where = f"{root}{self.path[1:]}" if self.path else root
        return f"{self.message} - at `{where.lstrip('.')}`" if where.lstrip(".") else self.message


def explain(exc: BaseException, document: str = "JSON") -> Problem:
    """Read a decoding or validation error (msgspec's, or the ``UnicodeDecodeError`` and
    ``RecursionError`` that msgspec raises for some inputs) into a :class:`Problem`;
    ``document`` names the format in a syntax error (``JSON``, ``TOML``)."""
    if isinstance(exc, UnicodeDecodeError):
        return Problem("utf8", f"not valid UTF-8 (byte {exc.start})")
    if isinstance(exc, RecursionError):
        return Problem("too_deep", "JSON is nested too deeply")
    text, path = str(exc), ""
    if (at := _AT.match(text)) is not None:
        text, path = at["text"], at["path"]
    if (m := _EXPECTED.match(text)) is not None:
        if m["got"]:
            return Problem("type", f"expected {m['want']}, got {m['got']}", path)
        return Problem("bound", f"expected {m['want']}{m['bound']}", path)
    if (m := _MISSING.match(text)) is not None:
        return Problem("missing_field", f"missing required field `{m['name']}`", path)
    if (m := _UNKNOWN.match(text)) is not None:
        return Problem("unknown_field", f"unknown field `{m['name']}`", path)
    if isinstance(exc, msgspec.ValidationError) and (m := _ENUM.match(text)) is not None:
        return Problem("bad_value", f"not one of the allowed values: {m['value']}", path)
    if text.startswith("Number out of range"):
        return Problem("out_of_range", "number out of range", path)
    if "UTF-8" in text:
        return Problem("utf8", "not valid UTF-8", path)
    if text.startswith("Input data was truncated"):
        return Problem("json", f"not valid {document}: it ends too soon", path)
    if (m := _MALFORMED.match(text)) is not None:
        byte = _BYTE.search(m["why"])
        return Problem("json", f"not valid {document} (byte {byte.group(1)})" if byte else f"not valid {document}", path)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return Problem("json", f"not valid {document}: {text}", path)
    return Problem("other", text, path)
