"""Errors of the router package."""

from __future__ import annotations

from ledgerbus.bus.errors import LedgerbusError


class RouterError(LedgerbusError):
    """Root of the router's errors."""


class AuditAppendError(RouterError):
    """An audit record was not acknowledged as the next in the chain.

    Some records of the batch may have been stored: the router rebuilds its state and
    chain head from the log before it goes on, and never acts on the failed batch.
    """


class ChainBrokenError(RouterError):
    """The stored audit chain does not verify; the router refuses to extend it."""


class LogUnreadableError(RouterError):
    """A record of the audit log does not decode with this router's schema (a newer
    ledgerbus wrote it): the router refuses to serve, since its state would lack it."""


class ChainRestartedError(RouterError):
    """The AUDIT stream no longer holds a checkpoint this router's key signed and anchored
    outside it (deleted, replaced, cut short): the router refuses to start a new chain."""
