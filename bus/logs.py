"""structlog configuration, applied once in each process entry point.

Console output for a person at a terminal, JSON lines in production; every line logged
inside a span carries its ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import msgspec
import structlog
from opentelemetry import trace


def add_trace_ids(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: bind the current span's ids to the log line."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


@contextlib.contextmanager
def bound_contextvars(**kw: Any) -> Iterator[None]:
    """structlog's ``bound_contextvars``, for a task that binds keys of its own: set them,
    then reset them by token. structlog's copies the whole context to save what it
    replaces (6 µs against 2.6; in an echo agent, 7% of its CPU)."""
    tokens = structlog.contextvars.bind_contextvars(**kw)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def shared_processors() -> list[Any]:
    """Every processor but the renderer: bound context (``task_id``, ``agent``), level,
    time, the current span's ids, exceptions."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
        structlog.processors.format_exc_info,
    ]


_json = msgspec.json.Encoder()


def render_json(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """One JSON line; a value JSON cannot hold is written as its ``str``."""
    return _json.encode({k: v if isinstance(v, str | int | float | bool | None) else _plain(v)
                         for k, v in event_dict.items()}).decode()


def _plain(value: Any) -> Any:
    try:
        return msgspec.to_builtins(value)
    except TypeError:
        return str(value)


def render_plain(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """The console layout (``time [level] event  key=value ...``) without colours or
    alignment work: what a log collector or ``honcho`` gets when stderr is no terminal.
    structlog's ConsoleRenderer took 60 µs a line."""
    event = event_dict.pop("event", "")
    level = event_dict.pop("level", "")
    stamp = event_dict.pop("timestamp", "")
    exc = event_dict.pop("exception", None)
    pairs = " ".join(f"{k}={v}" if isinstance(v, str) and v and " " not in v and "=" not in v else f"{k}={v!r}"
                     for k, v in sorted(event_dict.items()))
    line = f"{stamp} [{level:<9}] {event:<30} {pairs}".rstrip()
    return f"{line}\n{exc}" if exc else line


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Configure structlog for the process: ``fmt`` is ``console`` (coloured at a
    terminal, plain otherwise) or ``json``."""
    renderer: Any = (
        render_json if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=True) if sys.stderr.isatty()
        else render_plain
    )
    structlog.configure(
        processors=[*shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
