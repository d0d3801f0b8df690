"""Acks sent a moment late: those of a message that came alone (nothing queued behind it).

One task at a time, each process's ack of the message it just settled went out beside the
task's next steps: the router's INGRESS ack while the agent ran the task and its report
was stored, the agent's WORK ack while the router checked and recorded that report.
nats-server, woken for each ack, removed the message from its work-queue stream (and
replaced the emptied block file), on a two-core machine beside them. Sent ``ACK_LATER_S``
later, they land after those steps, several together. Measured at 3 ms in one run each
(blocks of 50 lone tasks switching it on and off, three runs a side), p50 of a lone task:
the router's ack 0.11-0.19 ms lower, the agent's 0.19-0.42 ms lower; nats-server's CPU per
task lower too.

Only a message that came alone is held: the router's batch of one, an agent's item whose
delivery said nothing was queued behind it (acks of a batch go out at once, as before).
And only once it is settled, its outcome stored. An ack that never goes out (the process
killed meanwhile) is a redelivery after AckWait, settled as after a crash before any ack:
the router finds the message's record and records nothing twice (invariant 2 of
docs/architecture.md); a redelivered work item's claim is refused, its task having ended
(a skill that claims with its result runs again first, and that report is refused).
"""

from __future__ import annotations

import asyncio

import nats.errors
import structlog
from nats.aio.msg import Msg

log = structlog.get_logger(__name__)

ACK_LATER_S = 0.02
"""How long the ack of a message that came alone waits. One task at a time, tasks follow
each other every 2-3 ms: 3 ms (the first value) sent each ack by itself during the next
task; 20 ms sends those of several tasks in one write, which nats-server removes together.
Six in-run probes against 3 ms (2,000 lone tasks each; 10, 20 and 50 ms): p50 0.02-0.12 ms
lower in every one, nats-server's CPU per task 0.04-0.12 ms lower."""


class LaterAcks:
    """Acks due, sent together ``delay`` seconds after the first of them was added."""

    def __init__(self, delay: float = ACK_LATER_S) -> None:
        self.delay = delay
        self._due: list[Msg] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, msg: Msg) -> None:
        """Ack ``msg`` (settled) a moment from now."""
        self._due.append(msg)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._send_due)

    def _send_due(self) -> None:
        self._timer = None
        due, self._due = self._due, []
        task = asyncio.ensure_future(_ack(due))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def flush(self) -> None:
        """Send every ack due now and wait until each is written (before a stop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._send_due()
        if self._sending:
            await asyncio.gather(*list(self._sending))


async def _ack(msgs: list[Msg]) -> None:
    for msg in msgs:
        try:
            await msg.ack()
        except nats.errors.Error as exc:
            # Not acked: redelivered after AckWait and settled again (the module says how).
            log.warning("late_ack_failed", subject=msg.subject, error=str(exc))
