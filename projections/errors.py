"""Errors of the projections package."""

from __future__ import annotations

from ledgerbus.bus.errors import LedgerbusError


class ProjectionError(LedgerbusError):
    """Root of the projections' errors."""


class DatabaseError(ProjectionError):
    """The projection database could not be opened, read or written."""


class SchemaMismatch(DatabaseError):
    """The database file was made by another projection schema: rebuild it from the log."""


class SnapshotRejected(ProjectionError):
    """A projection snapshot that may not be started from; the message says why."""


class LogGapError(ProjectionError):
    """AUDIT does not hold the records a projection needs next: they were archived and
    purged (or lost). ``position`` is the projection's, ``next_seq`` the first record
    AUDIT holds after it."""

    def __init__(self, message: str, position: int, next_seq: int) -> None:
        super().__init__(message)
        self.position = position
        self.next_seq = next_seq
