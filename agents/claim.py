"""The claim of one attempt at a task, as an agent sends it (docs/architecture.md, "Claim
and result together")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.msg import Msg

from ledgerbus.bus.events import Claim, TaskCompleted, TaskFailed
from ledgerbus.bus.messages import WorkItem

if TYPE_CHECKING:
    from ledgerbus.agents.runtime import Agent


class AttemptClaim:
    """The claim of one attempt, sent when its skill says: before the skill runs
    (``claim_first``, the default), or once the skill has run ``claim_after_s``, or not at
    all, carried by a result that came sooner (one message, one record, one router hop
    fewer: docs/architecture.md, "Claim and result together"). Whatever the skill sends
    meanwhile (progress, usage, memory, subtasks) waits for the claim to be accepted."""

    def __init__(self, agent: Agent, item: WorkItem, attempt: int, msg: Msg, tlog: Any) -> None:
        self._agent, self._item, self._attempt, self._msg, self._log = agent, item, attempt, msg, tlog
        self._sent: asyncio.Task[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.on_refused: Callable[[], Any] | None = None
        """Called when the router refuses the claim (or never answers) while the skill runs."""

    @property
    def refused(self) -> bool:
        """Whether the claim was sent and not accepted (``Agent._claim`` settled the message)."""
        sent = self._sent
        return sent is not None and sent.done() and not sent.cancelled() and sent.exception() is None \
            and not sent.result()

    def send_after(self, delay: float) -> None:
        """Send the claim in ``delay`` seconds unless a result carries it first."""
        self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> asyncio.Task[bool]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sent is None:
            self._sent = asyncio.create_task(self._agent._claim(self._item, self._attempt, self._msg, self._log))
            self._sent.add_done_callback(self._settled)
        return self._sent

    def _settled(self, sent: asyncio.Task[bool]) -> None:
        if sent.cancelled() or sent.exception() is not None:
            return
        if sent.result():
            # The log line of the claim's record: a task whose result carries its claim has
            # only its ``task_finished`` line.
            self._log.info("task_started")
        elif self.on_refused is not None:
            self.on_refused()

    async def send(self) -> bool:
        """Send the claim now unless it was sent; whether the router accepted it."""
        return await self._start()

    async def result(self, result: TaskCompleted | TaskFailed) -> TaskCompleted | TaskFailed | None:
        """The result to report: carrying the claim if it was never sent, as it is once the
        claim was accepted, ``None`` if the claim was refused or never answered."""
        if self._sent is None:
            self.abandon()
            return msgspec.structs.replace(result, claim=Claim(dispatch=self._item.dispatch, token=self._item.token))
        return result if await self._sent else None

    def abandon(self) -> None:
        """Send no claim after all (the agent is draining, or a result carries it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sent is not None and not self._sent.done():
            self._sent.cancel()
