"""The root error of ledgerbus and the foundation's own errors.

Each package has its own root error under :class:`LedgerbusError`; third-party errors
(nats, sqlite, msgspec) are wrapped at the boundary with ``raise ... from``.
"""

from __future__ import annotations

from typing import Any


class LedgerbusError(Exception):
    """Root of every error ledgerbus raises on purpose."""


class ConfigError(LedgerbusError):
    """A setting is missing or malformed."""


class BusError(LedgerbusError):
    """Talking to NATS failed: connection, provisioning, a publish that was not acknowledged."""


class ServerError(BusError):
    """The embedded nats-server could not be found, started or stopped."""


class SchemaError(LedgerbusError):
    """Bytes did not decode as the expected message type; the message names the path.

    ``problem`` (a :class:`bus.problems.Problem`, when the error came from decoding) says
    the same for machines: its kind and path.
    """

    def __init__(self, message: str, problem: Any = None) -> None:
        super().__init__(message)
        self.problem = problem


class UnreadableRecord(SchemaError):
    """A record stored in AUDIT that this process cannot decode; ``seq`` names it.

    ``newer`` is whether it looks written by a newer ledgerbus (a field or a value this
    version does not know): the reader must be upgraded, not the record skipped.
    """

    def __init__(self, message: str, problem: Any, seq: int, newer: bool) -> None:
        super().__init__(message, problem)
        self.seq = seq
        self.newer = newer


class ChainError(LedgerbusError):
    """The audit hash chain does not recompute; ``seq`` is the first bad sequence."""

    def __init__(self, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.seq = seq


class QueryError(BusError):
    """A projector query could not be answered, or was answered with an error."""


class NotFound(QueryError):
    """The projector answered: no such task, key or record (yet). ``position``: the last
    AUDIT record the answer had applied (``None`` if not known)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position
