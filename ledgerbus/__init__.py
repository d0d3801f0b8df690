"""ledgerbus: an event-sourced NATS JetStream message bus for multi-agent systems.

The public client (docs/client.md)::

    import ledgerbus

    async with ledgerbus.connect() as bus:
        task = await bus.submit("echo", {"text": "hi"})
        print(await task.result(timeout=30))

``connect_sync`` is the same with blocking calls. The names below are imported on first
use, so ``import ledgerbus.bus.codec`` (what agents and the router do) does not load the
client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledgerbus.bus.errors import LedgerbusError, NotFound, SchemaError
    from ledgerbus.bus.lifecycle import Status
    from ledgerbus.client import (
        Bus,
        Outcome,
        Page,
        Refused,
        TaskCancelled,
        TaskDenied,
        TaskError,
        TaskFailed,
        TaskHandle,
        TaskRejected,
        TaskTimeout,
        connect,
    )
    from ledgerbus.sync import SyncBus, SyncTaskHandle, connect_sync

_EXPORTS = {
    **dict.fromkeys(["Bus", "Outcome", "Page", "Refused", "TaskCancelled", "TaskDenied", "TaskError", "TaskFailed",
                     "TaskHandle", "TaskRejected", "TaskTimeout", "connect"], "ledgerbus.client"),
    **dict.fromkeys(["SyncBus", "SyncTaskHandle", "connect_sync"], "ledgerbus.sync"),
    **dict.fromkeys(["LedgerbusError", "NotFound", "SchemaError"], "ledgerbus.bus.errors"),
    "Status": "ledgerbus.bus.lifecycle",
}

__all__ = [
    "Bus", "LedgerbusError", "NotFound", "Outcome", "Page", "Refused", "SchemaError", "Status", "SyncBus",
    "SyncTaskHandle", "TaskCancelled", "TaskDenied", "TaskError", "TaskFailed", "TaskHandle", "TaskRejected",
    "TaskTimeout", "connect", "connect_sync",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ledgerbus' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
