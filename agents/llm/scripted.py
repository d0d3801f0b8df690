"""Canned answers, for tests and demos: ``type = "scripted"`` in the routing file.

A scripted provider answers each call with the next answer of its queue, in order,
whatever the request says: from ``answers`` in the routing file, or from a ``file`` with
one JSON value a line (a string, or an object with ``text`` and optionally ``data``,
``tokens_in``, ``tokens_out`` and ``stop_reason``). It is never chosen silently: it
answers only when a route names it, and making one logs a warning
(``llm_provider_scripted``) that its answers are canned, not a model's. Its results carry
the provider's name and the model as routed, like any other provider's.

A structured request (one with a schema) takes the answer's ``data``; an answer without
``data`` has its ``text`` decoded as JSON, and text that is not JSON is ``malformed``, as
from the OpenAI-compatible provider. When the queue is empty, a call fails as
``exhausted``, which the router does not fall back from: a script that ran short is a
mistake in the test or the demo, not something another model should hide.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
import structlog

from ledgerbus.agents.llm.base import ChatRequest, ChatResult, ProviderError, excerpt
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.problems import explain

log = structlog.get_logger(__name__)

_Count = Annotated[int, msgspec.Meta(ge=0)]


class ScriptedAnswer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One canned answer (a plain string in the file or the routing file is ``text``)."""

    text: str = ""
    """The answer's text; for an answer with ``data`` and no ``text``, the data as JSON."""
    data: Any = None
    """What a structured request decodes to (``None``: decode ``text`` as JSON)."""
    tokens_in: _Count = 0
    tokens_out: _Count = 0
    stop_reason: str = ""


AnswerLine = str | ScriptedAnswer
"""One answer as the routing file or an answers file writes it."""

_line_decoder = msgspec.json.Decoder(AnswerLine)


def read_answers(path: Path) -> list[AnswerLine]:
    """The answers of a file, one JSON value a line (blank lines skipped); a
    :class:`~bus.errors.ConfigError` naming the file and the line for anything else."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    answers: list[AnswerLine] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            answers.append(_line_decoder.decode(line))
        except msgspec.DecodeError as exc:  # ValidationError included
            raise ConfigError(f"{path} line {number}: {explain(exc).at('')}") from exc
    return answers


class ScriptedProvider:
    """A queue of canned answers: ``ScriptedProvider("demo", answers=["hi", {"data": {...}}])``.

    ``answers`` are strings, :class:`ScriptedAnswer` or mappings of its fields. The queue
    belongs to the instance: every task of an agent process that routes to the provider
    takes from the same one, in the order the calls arrive.
    """

    def __init__(self, name: str, *, answers: Iterable[AnswerLine | Mapping[str, Any]]) -> None:
        self.name = name
        self._queue: deque[ScriptedAnswer] = deque(_answer(a) for a in answers)
        self.total = len(self._queue)
        """How many answers the provider started with."""
        log.warning("llm_provider_scripted", provider=name, answers=self.total,
                    note="answers are canned, not a model")

    @classmethod
    def from_file(cls, name: str, path: Path) -> ScriptedProvider:
        """The provider answering from the answers file at ``path`` (:func:`read_answers`)."""
        return cls(name, answers=read_answers(path))

    @property
    def left(self) -> int:
        """How many answers are still queued."""
        return len(self._queue)

    async def chat(self, request: ChatRequest, *, model: str, max_tokens: int,
                   params: dict[str, Any]) -> ChatResult:
        """The next answer, as this call's result; ``exhausted`` when none is left."""
        # Taken before any await: concurrent calls in one event loop each get their own answer.
        try:
            answer = self._queue.popleft()
        except IndexError:
            raise ProviderError.of("exhausted", f"scripted provider {self.name!r} has no answer left (it had"
                                   f" {self.total})", provider=self.name, model=model) from None
        data = answer.data
        if request.schema is not None and data is None:
            try:
                data = msgspec.json.decode(answer.text)
            except msgspec.DecodeError as exc:
                raise ProviderError.of("malformed", f"the scripted answer is not JSON: {excerpt(answer.text)}",
                                       provider=self.name, model=model) from exc
        return ChatResult(text=answer.text, data=data, provider=self.name, model=model,
                          tokens_in=answer.tokens_in, tokens_out=answer.tokens_out, stop_reason=answer.stop_reason)

    async def aclose(self) -> None:
        """Nothing to close: no client, no connection."""


def _answer(value: AnswerLine | Mapping[str, Any]) -> ScriptedAnswer:
    if isinstance(value, str):
        value = ScriptedAnswer(text=value)
    elif not isinstance(value, ScriptedAnswer):
        value = msgspec.convert(value, ScriptedAnswer)
    if value.data is not None and not value.text:
        value = msgspec.structs.replace(value, text=msgspec.json.encode(value.data).decode())
    return value
