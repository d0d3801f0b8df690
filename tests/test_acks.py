"""Late acks (bus/acks.py): those due within one delay go out together, counted from the
first of them; one that fails does not keep the others back; a flush sends what is due."""

from __future__ import annotations

import asyncio

import nats.errors

from ledgerbus.bus.acks import LaterAcks


class Delivered:
    """Stands in for a delivered message: its ``ack`` notes when it was sent."""

    def __init__(self, sent: list[tuple[str, float]], name: str, fails: bool = False) -> None:
        self.subject = f"work.{name}"
        self.sent, self.name, self.fails = sent, name, fails

    async def ack(self) -> None:
        if self.fails:
            raise nats.errors.ConnectionClosedError
        self.sent.append((self.name, asyncio.get_running_loop().time()))


async def test_acks_due_within_one_delay_go_out_together_after_the_first_ones_delay() -> None:
    sent: list[tuple[str, float]] = []
    acks, loop = LaterAcks(delay=0.2), asyncio.get_running_loop()
    start = loop.time()
    acks.add(Delivered(sent, "a"))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    acks.add(Delivered(sent, "lost", fails=True))  # type: ignore[arg-type]
    acks.add(Delivered(sent, "b"))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert sent == [], "an ack went out before its delay"
    await asyncio.sleep(0.15)
    await acks.flush()
    assert [name for name, _ in sent] == ["a", "b"]  # the failed one logged, the next still sent
    assert all(0.2 <= at - start < 0.29 for _, at in sent), "b waited a delay of its own, not a's"
    added = loop.time()
    acks.add(Delivered(sent, "c"))  # type: ignore[arg-type]
    await acks.flush()  # a stop: sent now, not a delay later
    assert sent[-1][0] == "c" and sent[-1][1] - added < 0.1
