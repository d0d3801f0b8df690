"""Secrets in text: where they are, and the text with each replaced by ``[REDACTED:<kind>]``.

The router runs this on every message it decodes (``router/checks/secrets.py``), on what it
keeps of one it cannot decode, on its rejection reasons, and on every span attribute whose
value a client chose (:func:`bus.tracing.messaging`). Three families of rule:

- **Shapes**, credentials whose form gives them away wherever they appear: PEM private
  keys, AWS access key ids, GitHub, Slack, Stripe, Google API and OAuth-client, Anthropic
  and OpenAI keys, JWTs, and the password in a ``scheme://user:password@host`` URL.
- **Pairs**, the secret half of a credential pair found by its public half: a 40-character
  AWS secret access key within 256 bytes of an access key id.
- **Names**, a value under a key-like name (``password``, ``secret``, ``token``,
  ``api_key``, ``client_secret``, ``Authorization``...): a JSON key at any depth, or
  ``NAME=value``, ``name: value``, ``"name": "value"`` inside a string (a .env file, a
  shell command, a query string, JSON or YAML pasted into an input), when the value is long
  and random enough (Shannon entropy per character) and is not a placeholder, a variable
  reference or a dotted name in code.

The entropy rule is tied to the name on purpose: the bus is full of random-looking
values that are not secret (sha256 digests, UUIDs, commit ids, message ids, base64 under
ordinary keys), and none of them is flagged. ``tests/test_secrets.py`` measures the false
positive rate on a corpus of ordinary payloads and the detection rate on fake secrets;
docs/security.md has the figures.

Cost (it runs on every message): every rule is a compiled expression that starts with a
literal (``AKIA``, ``sk-``, ``token``...), which the regex engine finds at memory-search
speed; on a short text one pass over every literal first picks the rules worth running.
Python looks only at what a whole expression matched: entropy is computed for candidates
under a key-like name, never for every token. The key-name rules run on an
ASCII-lowercased copy (``bytes.lower`` keeps every offset). ``python -m bench.secrets``
measures it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple


class Finding(NamedTuple):
    """A secret at ``data[start:end]``, of ``kind``."""

    start: int
    end: int
    kind: str


# --- shapes ---------------------------------------------------------------------------
# Each expression starts with a literal, so the engine skips to candidates at memory-search
# speed (a leading look-behind makes it try every offset: 60x slower, measured). Named
# groups are the kinds, with "_" for "-". JSON text is scanned, so a PEM block's newlines
# are the two characters "\n". With each, the lowercase markers whose presence lets it
# match (see :func:`find`).

_SHAPES: tuple[tuple[tuple[bytes, ...], re.Pattern[bytes]], ...] = tuple((markers, re.compile(p)) for markers, p in (
    # To the END line, or else to the end of the string (an escape is one unit, so the
    # replacement never eats the backslash of an escaped quote and breaks the JSON).
    ((b"-----begin ",), rb"-----BEGIN (?P<private_key>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
                       rb"(?:(?:[^\"\\]|\\.)*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?:[^\"\\]|\\.)*))"),
    ((b"akia", b"asia", b"aiza"),
     rb"A(?:(?P<aws_access_key_id>(?:KIA|SIA)[0-9A-Z]{16}(?![0-9A-Za-z]))|(?P<google_api_key>Iza[0-9A-Za-z_-]{35}))"),
    ((b"sk-",), rb"sk-(?:(?P<anthropic_api_key>ant-[A-Za-z0-9_-]{20,})|(?P<openai_api_key>[A-Za-z0-9_-]{20,}))"),
    ((b"gh", b"github_pat_"), rb"g(?P<github_token>h[pousr]_[A-Za-z0-9]{36,}|ithub_pat_[A-Za-z0-9_]{22,})"),
    ((b"xox",), rb"xox(?P<slack_token>[abposr]-[A-Za-z0-9-]{10,})"),
    ((b"k_live_",), rb"k_live_(?P<stripe_secret_key>[0-9A-Za-z]{16,})"),
    ((b"eyj",), rb"eyJ(?P<jwt>[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*)"),
    ((b"gocspx-",), rb"GOCSPX-(?P<google_oauth_client_secret>[A-Za-z0-9_-]{24,})"),
    # Only the password is redacted: the scheme, user and host stay readable. RFC 3986
    # keeps "[]" out of user info, which also keeps "://[REDACTED:...]@" from matching.
    ((b"://",), rb"://[^\s/:@\"'\\?#<>\[\]]*:(?P<url_password>[^\s/@\"'\\?#<>\[\],]+)@"),
))

_OPENAI_PREFIXES = (b"proj-", b"svcacct-", b"admin-")
_PEM_BODY = re.compile(rb"[A-Za-z0-9+/=]{8,}")


def _mixed(value: bytes) -> bool:
    """Upper case, lower case and a digit: random, not a word or a slug."""
    return (any(65 <= c <= 90 for c in value) and any(97 <= c <= 122 for c in value)
            and any(48 <= c <= 57 for c in value))


def _word_char(data: bytes, i: int) -> bool:
    """Whether ``data[i]`` continues a word, reading the JSON escapes ``\\n``, ``\\t``,
    ``\\r`` (a line break in a string) as the separators they stand for."""
    if i < 0:
        return False
    c = data[i]
    if c in b"nrt" and i > 0 and data[i - 1] == 92:
        return False
    return 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122


def _shapes(data: bytes, present: set[bytes] | None) -> Iterator[Finding]:
    for markers, pattern in _SHAPES:
        if present is not None and present.isdisjoint(markers):
            continue
        for m in pattern.finditer(data):
            group = m.lastgroup
            assert group is not None
            if group == "url_password":
                start, end = m.span(group)
                if not _placeholder(data[start:end]):
                    yield Finding(start, end, "url-password")
                continue
            start, end = m.span()
            if group == "private_key" and not _PEM_BODY.search(data, data.index(b"-----", m.start() + 11) + 5, end):
                continue  # the header alone, as a parser's constant: no key material
            if group == "stripe_secret_key":
                # The expression starts at "k_live_": the key is sk_live_... or rk_live_...
                start -= 1
                if start < 0 or data[start] not in b"rs":
                    continue
            if _word_char(data, start - 1):
                continue  # the tail of a longer token or word, not a key of its own
            if group == "openai_api_key" and not data.startswith(_OPENAI_PREFIXES, m.start(group)) \
                    and not _mixed(m.group(group)):
                continue  # "sk-learn-compatible-estimators": a slug, not a key
            yield Finding(start, end, group.replace("_", "-"))


# --- pairs ------------------------------------------------------------------------------

_AWS_SECRET = re.compile(rb"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_AWS_WINDOW = 256
_HEX = re.compile(rb"[0-9a-fA-F]+")


def _aws_secret_near(data: bytes, key_id: Finding) -> Iterator[Finding]:
    """40 base64 characters, mixed case (so not a hex digest or a commit id), near an id."""
    lo = max(0, key_id.start - _AWS_WINDOW)
    for m in _AWS_SECRET.finditer(data, lo, min(len(data), key_id.end + _AWS_WINDOW)):
        value = m.group()
        if (any(65 <= c <= 90 for c in value) and any(97 <= c <= 122 for c in value)
                and not _HEX.fullmatch(value)):
            yield Finding(m.start(), m.end(), "aws-secret-access-key")


# --- key-like names ---------------------------------------------------------------------
# After the name, either a JSON key's closing quote, a colon and the string value (v1: an
# unescaped quote after a name closes a JSON string, and only a key's is followed by a
# colon, so v1 never spans JSON structure), or, inside a string, an optional closing quote
# (escaped, for JSON in a string, or single), a separator, an optional auth scheme and the
# value: JSON in a string (v2), single-quoted (v3) or bare up to a delimiter (v4), as in
# a .env file, a command line or a query string. Matched on the lowercased text.
_TAIL = (rb"(?:\"[ \t]*:[ \t]*\"(?P<v1>(?:[^\"\\]|\\.)*)\""
         rb"|(?:\\[\"']|')?[ \t]*(?:=>|:=|[:=])[ \t]*(?P<scheme>(?:bearer|basic|token)[ \t]+)?"
         rb"(?:\\\"(?P<v2>[^\"\\]*)\\\"|'(?P<v3>[^'\\]*)'|(?P<v4>[^\s\"'\\,;&|<>(){}\[\]`]+)))")

# (marker, name expression, password-like, kind): password-like names take shorter,
# plainer values (a person chose them).
_NAMES: tuple[tuple[bytes, re.Pattern[bytes], bool, str], ...] = tuple(
    (marker, re.compile(rb"(?P<name>" + marker + rest + rb")" + _TAIL), pw, kind) for marker, rest, pw, kind in (
        (b"pass", rb"(?:word|wd|phrase)?", True, "password"),
        (b"pwd", b"", True, "password"),
        (b"secret", b"", True, "secret"),
        (b"token", b"", False, "secret"),
        (b"credential", b"s?", False, "secret"),
        (b"auth", rb"(?:orization)?", False, "secret"),
        (b"key", b"", False, "secret"),
    ))

# "key" alone is a map key, a memory key, an S3 object key: only these compounds are secret.
_KEY_OWNERS = tuple(p + sep for p in (b"api", b"access", b"secret", b"private", b"signing", b"encryption", b"master",
                                       b"client", b"app", b"auth", b"account", b"subscription", b"session")
                    for sep in (b"", b"_", b"-", b"."))
# Pagination cursors are random and harmless: nextToken, page_token, nextPageToken.
_CURSORS = (b"next", b"next_", b"page", b"page_", b"continuation", b"continuation_", b"sync", b"sync_")
# Names short enough to end other words ("bypass", "compass", "oauth"): they must begin one.
_WORD_START = (b"pass", b"pwd", b"auth")
_SCHEMES = (b"bearer ", b"basic ", b"token ")

# Not a secret, whatever the name: a placeholder, a reference, one repeated character,
# lowercase words joined into a name ("db-credentials"), a literal word.
_PLACEHOLDER = re.compile(
    rb"\$\{|\$\(|\$[A-Za-z_][A-Za-z0-9_]*$|%\(|\{\{|<[^>]*>$|\[REDACTED|(.)\1*$|[a-z]+(?:[-_.][a-z]+)+$"
    rb"|(?:true|false|null|none|nil|undefined|required|optional|string|pass|passwd|password|pwd|secret|token"
    rb"|hidden|redacted"
    rb"|changeme|example|placeholder)$",
    re.IGNORECASE,
)
# Code, not a value, when bare in text: a dotted name (``api_key = settings.API_KEY``), a
# CONSTANT, or a name of letters only (``credentials: GoogleCredentials``, a type).
_CODE = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+|[A-Z_][A-Z0-9_]*|[A-Za-z_]+")
# A camelCase name of letters only: a label ("challengePassword"), even in quotes.
_CAMEL = re.compile(rb"[a-z]+(?:[A-Z][a-z]+)+")
# Runs of three or more lower-case letters: words. Random strings have few.
_LOWER_RUNS = re.compile(rb"[a-z]{3,}")
_SPACE = re.compile(rb"\s|\\[nrt]")


def _placeholder(value: bytes) -> bool:
    return _PLACEHOLDER.match(value) is not None


def entropy(value: bytes) -> float:
    """Shannon entropy of ``value`` in bits per byte."""
    n = len(value)
    return -sum(k / n * math.log2(k / n) for k in Counter(value).values()) if n else 0.0


def _classes(value: bytes) -> int:
    """How many of lower case, upper case, digits and symbols (not ``-_.``) occur."""
    return (any(97 <= c <= 122 for c in value) + any(65 <= c <= 90 for c in value)
            + any(48 <= c <= 57 for c in value) + any(not chr(c).isalnum() and c not in b"-_." for c in value))


def _wordy(value: bytes) -> bool:
    """Whether words (lower-case runs of three or more) make up half of ``value``:
    ``X509WorkloadIdentity`` is, a random token is not."""
    return sum(len(w) for w in _LOWER_RUNS.findall(value)) * 2 >= len(value)


def looks_secret(value: bytes, password_like: bool, quoted: bool, schemed: bool = False) -> bool:
    """Whether ``value``, found under a key-like name, is random enough to be a secret.

    A password-like name (``password``, ``secret``, ``pwd``) takes 6 bytes and 2 bits per
    byte (a password may be a word); any other (``token``, ``api_key``...) 16 bytes, 3
    bits per byte, more than one class of character and not mostly words; a value after
    ``Bearer``/``Basic`` 8 bytes and 2.5 bits. An unquoted value (in text, where code
    looks alike) must not be a dotted name, a CONSTANT or a name of letters only, and a
    password in text needs two classes of character.
    """
    if schemed:
        min_len, min_bits = 8, 2.5
    elif password_like:
        min_len, min_bits = 6, 2.0
    else:
        min_len, min_bits = 16, 3.0
    if len(value) < min_len or _SPACE.search(value) or _placeholder(value):
        return False
    if not quoted and _CODE.fullmatch(value):
        return False
    if password_like:
        if _CAMEL.fullmatch(value) if quoted else _classes(value) < 2:
            return False
    elif _classes(value) < 2 or _wordy(value):
        return False
    return entropy(value) >= min_bits


def _named(data: bytes, low: bytes, present: set[bytes] | None) -> Iterator[Finding]:
    for marker, pattern, password_like, kind in _NAMES:
        if present is not None and marker not in present:
            continue
        for m in pattern.finditer(low):
            i = m.start()
            name = m.group("name")
            if name in _WORD_START and _word_char(data, i - 1) and not (
                    65 <= data[i] <= 90 and 97 <= data[i - 1] <= 122):  # camelCase dbPass begins a word
                continue
            if name == b"key" and not low.endswith(_KEY_OWNERS, 0, i):
                continue
            if name == b"token" and low.endswith(_CURSORS, 0, i):
                continue
            group = next(g for g in ("v1", "v2", "v3", "v4") if m.group(g) is not None)
            start, end = m.span(group)
            schemed = m.group("scheme") is not None
            if group != "v4" and low.startswith(_SCHEMES, start):
                start = low.index(b" ", start) + 1
                schemed = True
            if group == "v4" and data[end:end + 1] in (b"(", b"["):
                continue  # a call or a subscript: code
            if looks_secret(data[start:end], password_like, group != "v4", schemed):
                yield Finding(start, end, kind)


# --- the scan ---------------------------------------------------------------------------

# Every rule's markers in one expression: on a short text one pass over it says which rules
# can match (measured: under 1 us on a message id, 5 on a 300-byte message, where starting
# all 16 rules costs 10); on a long one it is slower than the rules' own literal searches
# (18 against 0.6 ns per byte per rule), so there every rule runs.
_MARKERS = sorted({m for markers, _ in _SHAPES for m in markers} | {marker for marker, _, _, _ in _NAMES})
# Factored by first byte ("a(?:kia|sia|iza|uth)|..."): a quarter faster than a flat list.
_MARKER = re.compile(b"|".join(
    re.escape(first) + b"(?:" + b"|".join(re.escape(m[1:]) for m in sorted(group, key=len, reverse=True)) + b")"
    for first, group in itertools.groupby(_MARKERS, key=lambda m: m[:1])
))
_SHORT = 1024


def find(data: bytes) -> list[Finding]:
    """Every secret in ``data``, in order, overlapping findings merged (a specific shape
    names the merged finding over a generic name rule)."""
    low = data.lower()
    present: set[bytes] | None = None
    if len(data) < _SHORT:
        first = _MARKER.search(low)
        if first is None:
            return []  # the common case for an id or a subject
        present = set(_MARKER.findall(low, first.start()))
    found = list(_shapes(data, present))
    found += [s for f in found if f.kind == "aws-access-key-id" for s in _aws_secret_near(data, f)]
    found += _named(data, low, present)
    if not found:
        return found
    # Shapes and pairs before names at the same offset, so the specific kind wins.
    generic = ("password", "secret")
    found.sort(key=lambda f: (f.start, f.kind in generic))
    merged = [found[0]]
    for f in found[1:]:
        last = merged[-1]
        if f.start < last.end:
            if f.end > last.end:
                merged[-1] = last._replace(end=f.end)
        else:
            merged.append(f)
    return merged


def redact_bytes(data: bytes) -> tuple[bytes, list[str]]:
    """``data`` with every secret replaced by ``[REDACTED:<kind>]``, and the kinds found
    (sorted). Inside a JSON string the replacement keeps the JSON valid."""
    found = find(data)
    if not found:
        return data, []
    out: list[bytes] = []
    at = 0
    for f in found:
        # A finding that starts or ends inside an escape (the ``n`` of ``\\n`` is a base64
        # character too) would leave half of it behind: the escape is kept whole, after
        # the replacement at a start, inside it at an end.
        start, end = _past_escape(data, max(f.start, at)), _past_escape(data, f.end)
        if start >= end:
            continue
        out += (data[at:start], b"[REDACTED:" + f.kind.encode() + b"]")
        at = end
    out.append(data[at:])
    return b"".join(out), sorted({f.kind for f in found})


def _past_escape(data: bytes, at: int) -> int:
    """``at``, or the end of the JSON escape (``\\n``, ``\\u00e9``) it falls inside."""
    for p in range(at - 1, max(-1, at - 6), -1):
        if data[p] != 0x5C:  # not a backslash
            continue
        run = 0  # backslashes before it: an odd number make it the second half of an escaped one
        while p - run - 1 >= 0 and data[p - run - 1] == 0x5C:
            run += 1
        if run % 2:
            return at
        length = 6 if data[p + 1:p + 2] == b"u" else 2
        return max(at, p + length)
    return at


def redact(text: str) -> tuple[str, list[str]]:
    """``text`` with every secret replaced, and the kinds of secret found (sorted)."""
    if not text:
        return text, []
    data = text.encode("utf-8", "surrogatepass")
    redacted, kinds = redact_bytes(data)
    return (redacted.decode("utf-8", "surrogatepass") if kinds else text), kinds


def scrub(text: str) -> str:
    """``text`` with every secret replaced: for values a client chose that end up in a
    span attribute, a log line or a reason."""
    return redact(text)[0]


KINDS: tuple[str, ...] = (
    "private-key", "aws-access-key-id", "aws-secret-access-key", "google-api-key", "google-oauth-client-secret",
    "anthropic-api-key", "openai-api-key", "github-token", "slack-token", "stripe-secret-key", "jwt",
    "url-password", "password", "secret",
)
"""Every kind a redaction can name."""
