"""What every LLM provider speaks: one chat request in, one result (or a typed error) out.

Skills never talk to a provider directly: they call ``ctx.llm.chat(...)`` (an
:class:`agents.llm.router.LLM`), which picks the provider and model for the skill or
role from the routing file, falls back in order on rate limits, timeouts, server
errors and providers configured without their key, and reports every call's usage. Keys come only from the environment.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import msgspec

from ledgerbus.agents.errors import AgentError


class Message(msgspec.Struct, frozen=True):
    """One turn of the conversation."""

    role: Literal["user", "assistant"]
    content: str


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A chat completion as a skill asks for it (the route adds model and parameters)."""

    messages: list[Message]
    system: str = ""
    max_tokens: int | None = None
    """``None``: the route's ``max_tokens``."""
    temperature: float | None = None
    schema: dict[str, Any] | None = None
    """A JSON schema: ask the model for structured output that matches it (Anthropic: a
    forced tool whose input schema it is; OpenAI-compatible: ``response_format``
    ``json_schema``; scripted: the answer's ``data``)."""
    schema_name: str = "output"


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """What came back, and what it cost."""

    text: str
    """The model's text (for a structured request: the JSON it produced, as text)."""
    data: Any = None
    """For a structured request: the decoded JSON (not yet checked against the schema)."""
    provider: str
    """The provider's name in the routing file (``claude``, ``local``...)."""
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    stop_reason: str = ""


ErrorKind = Literal["rate_limited", "timeout", "server", "malformed", "refused", "config", "exhausted"]


class ProviderError(AgentError):
    """A provider call that failed. ``retryable`` kinds (rate limits, timeouts, 5xx,
    malformed bodies) move the router on to the next fallback, and so does ``config`` (a
    provider unusable as configured: no key), which the router then passes over; the
    others (``refused``: 4xx other than 429; ``exhausted``: a scripted provider out of
    answers) fail the call at once. A ``config`` error outside a candidate (no route at
    all) fails the call too."""

    RETRYABLE: frozenset[str] = frozenset({"rate_limited", "timeout", "server", "malformed"})

    def __init__(self, kind: ErrorKind, message: str, *, provider: str = "", model: str = "",
                 retry_after_s: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.provider = provider
        self.model = model
        self.retry_after_s = retry_after_s
        self.status = status

    @classmethod
    def of(cls, kind: ErrorKind, detail: str, *, provider: str, model: str = "", status: int | None = None,
           retry_after_s: float | None = None) -> ProviderError:
        """The error with its message in the one shape every provider uses:
        ``provider/model: kind (status, retry after Ns): detail``."""
        head = _head(kind, provider, model, status, retry_after_s)
        return cls(kind, f"{head}: {detail}", provider=provider, model=model, retry_after_s=retry_after_s,
                   status=status)

    @property
    def retryable(self) -> bool:
        """Whether the router should try the next candidate (see the class docstring)."""
        return self.kind in self.RETRYABLE

    @property
    def attempt(self) -> str:
        """This failure as one entry of the router's list of attempts, without the
        detail: ``claude/claude-x: rate_limited (429, retry after 2s)``."""
        return _head(self.kind, self.provider, self.model, self.status, self.retry_after_s)


def _head(kind: str, provider: str, model: str, status: int | None, retry_after_s: float | None) -> str:
    notes = [] if status is None else [str(status)]
    if retry_after_s is not None:
        notes.append(f"retry after {retry_after_s:g}s")
    where = "/".join(part for part in (provider, model) if part)
    paren = f" ({', '.join(notes)})" if notes else ""
    return f"{where}: {kind}{paren}" if where else f"{kind}{paren}"


def status_error(status: int, detail: str, headers: Mapping[str, str], *, provider: str,
                 model: str) -> ProviderError:
    """The :class:`ProviderError` for an HTTP error answer, the same for every provider:
    429 is ``rate_limited`` (with the server's ``retry-after``), 408 ``timeout``, 5xx
    (Anthropic's 529 "overloaded" included) ``server``, any other 4xx ``refused``."""
    kind: ErrorKind
    if status == 429:
        kind = "rate_limited"
    elif status == 408:
        kind = "timeout"
    elif status >= 500:
        kind = "server"
    else:
        kind = "refused"
    wait = retry_after_s(headers) if kind == "rate_limited" else None
    return ProviderError.of(kind, detail, provider=provider, model=model, status=status, retry_after_s=wait)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """How long the server asked us to wait: ``retry-after-ms`` (OpenAI's, and the more
    precise), else ``retry-after`` in seconds or as an HTTP date; ``None`` if neither parses."""
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after")
    seconds = _seconds(value)
    if seconds is not None or value is None:
        return seconds
    try:
        return max((parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds(), 0.0)
    except (TypeError, ValueError):  # not a date, or one without a zone
        return None


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return max(number, 0.0) if math.isfinite(number) else None


def excerpt(value: object, limit: int = 200) -> str:
    """A bounded piece of an unexpected answer, for an error message (and no more: it is
    the model's or a proxy's text)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """One provider call, as reported to the router (a ``task_usage`` event)."""

    provider: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    outcome: str = "ok"
    """``ok``, ``replayed`` (answered from a recording), or the :class:`ProviderError`
    kind that ended the call."""
    call: str = ""
    """The recorded call (:mod:`agents.llm.calls`) that holds its request and answer."""


UsageSink = Callable[[Usage], Awaitable[None]]


class Provider(Protocol):
    """One configured backend (``[providers.NAME]`` in the routing file)."""

    name: str

    async def chat(self, request: ChatRequest, *, model: str, max_tokens: int,
                   params: dict[str, Any]) -> ChatResult:
        """Run one completion; raise :class:`ProviderError` for anything but a good answer."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP client."""
        ...
