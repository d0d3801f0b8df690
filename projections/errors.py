"""Errors of the projections package."""

from __future__ import annotations

from ledgerbus.bus.errors import LedgerbusError


class ProjectionError(LedgerbusError):
    """Root of the projections' errors."""


class DatabaseError(ProjectionError):
    """The projection database could not be opened, read or written."""


class SchemaMismatch(DatabaseError):
    """The database file was made by another projection schema: rebuild it from the log."""
