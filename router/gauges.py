"""The router's gauges: tasks by state and WORK's depth per skill, read by the metrics
exporter's thread from a snapshot the router replaces whole every few seconds."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats.errors
import structlog
from nats.js import JetStreamContext

from ledgerbus.bus import metrics, subjects
from ledgerbus.router.state import RouterState

log = structlog.get_logger(__name__)

INTERVAL_S = 5.0
"""How often the router refreshes the gauges (when metrics are exported)."""

_latest: dict[str, dict[tuple[tuple[str, str], ...], float]] = {"tasks": {}, "queue": {}}
metrics.observe("ledgerbus.tasks", "{task}", "Tasks the router knows, by state", lambda: _latest["tasks"])
metrics.observe("ledgerbus.queue.depth", "{message}", "Work items queued or in flight in WORK, by skill",
                lambda: _latest["queue"])


class Gauges:
    """Refreshes the snapshot, only when ``enabled`` (metrics exported: nothing reads it
    otherwise)."""

    def __init__(self, js: JetStreamContext, enabled: bool) -> None:
        self.js = js
        self.enabled = enabled
        self._at = 0.0

    async def refresh(self, state: RouterState, force: bool = False) -> None:
        """Recount tasks by state and read WORK's depth per skill, every few seconds (now,
        with ``force``: the last export at exit then reads the state as it is)."""
        now = asyncio.get_running_loop().time()
        if not self.enabled or (now - self._at < INTERVAL_S and not force):
            return
        self._at = now
        states = Counter(task.status for task in state.tasks.values())
        _latest["tasks"] = {(("state", status),): n for status, n in states.items()}
        try:
            info = await self.js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.WORK_ALL)
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("queue_depth_unavailable", error=str(exc))
            return
        _latest["queue"] = {(("skill", subject.removeprefix("work.")),): n
                            for subject, n in (info.state.subjects or {}).items()}
