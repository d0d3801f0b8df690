"""Connecting: processes may start before the server; refused or absent servers fail clearly;
a PubAck that never comes does not hang its publisher; a flush covers what was sent before it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import nats.errors
import pytest

from ledgerbus.bus.connection import Client, cancel_requested, connect
from ledgerbus.bus.errors import BusError
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from tests.support import auth_dir, server_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_wrong_credentials_fail_at_once_naming_the_user(settings: Settings) -> None:
    bad = settings.replace(user="agent-a1", password="wrong", connect_timeout_s=30)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(BusError, match="refused the credentials of user 'agent-a1'"):
        await connect(bad, "agent-a1")
    assert loop.time() - start < 10, "a refusal must not wait out the connect timeout"


async def test_no_server_fails_within_the_connect_timeout() -> None:
    settings = Settings(url=f"nats://127.0.0.1:{free_port()}", connect_timeout_s=1.0, user="u", password="p")
    with pytest.raises(BusError, match="cannot connect to .* within 1s"):
        await connect(settings, "cli")


async def test_a_first_connect_whose_retries_drop_a_cancel_still_ends_at_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py retries a first connection with ``wait_for``, which on Python 3.11 can drop
    a cancel (CPython gh-86296); its retries go on for ever. Past the timeout, ``connect``
    must still end with its error, not wait for them."""
    dropped = 0

    async def retrying(self: Client, **_: object) -> None:
        nonlocal dropped
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if dropped:
                    raise
                dropped += 1  # as if wait_for had dropped it: try again

    async def closed(self: Client) -> None:
        return None  # nothing was opened

    monkeypatch.setattr(Client, "connect", retrying)
    monkeypatch.setattr(Client, "close", closed)
    settings = Settings(url=f"nats://127.0.0.1:{free_port()}", connect_timeout_s=0.5, user="u", password="p")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(BusError, match="cannot connect to .* within 0.5s"):
        await asyncio.wait_for(connect(settings, "cli"), 30)  # this test's own limit, if it hangs
    assert dropped == 1
    assert loop.time() - start < 10, "connect waited for the retries until this test's own limit"


async def test_a_process_started_before_the_server_connects_when_it_comes_up(tmp_path: Path) -> None:
    port = free_port()
    config = server_config(tmp_path / "conf")
    settings = Settings(url=f"nats://127.0.0.1:{port}", connect_timeout_s=20, auth_dir=auth_dir(config))
    connecting = asyncio.create_task(connect(settings, "cli-tester"))
    await asyncio.sleep(0.5)  # the point of the test: the server is not there yet
    assert not connecting.done()
    async with NatsServer(tmp_path / "js", config=config, port=port):
        nc = await connecting
        assert nc.is_connected
        await nc.close()


async def test_a_flush_reaches_the_server_after_what_was_sent_before_it(tmp_path: Path) -> None:
    """The server's trace shows what the client sent, in order: a drain's UNSUB, then the
    PING whose PONG tells the client that nothing more will come. nats-py's own client
    sends that PING first (bus/connection.Client says how): the drain then drops the
    subscription while the server still delivers to it (0 to 36 of 200 requests went
    there in tries on this machine, depending on its load)."""
    async with NatsServer(tmp_path / "js", extra_args=("-V",)) as server:
        nc = Client()
        await nc.connect(server.url)
        try:
            sub = await nc.subscribe("svc", cb=_ignore)
            await nc.flush()
            await sub.drain()
            await server.wait_for_log("<<- [UNSUB")
        finally:
            await nc.close()
    sent = [line.split("<<- [", 1)[1].rstrip("]").strip() for line in server.log_tail if "<<- [" in line]
    after_sub = sent[next(i for i, op in enumerate(sent) if op.startswith("SUB svc")) + 1:]
    assert [op.split()[0] for op in after_sub[:3]] == ["PING", "UNSUB", "PING"], sent


async def _ignore(msg: object) -> None:
    pass


async def test_a_loop_whose_cancellation_is_swallowed_still_stops() -> None:
    # What nats.py can do to a cancellation that lands inside a call: turn it into its
    # TimeoutError. A retry loop that only relied on CancelledError would spin for ever.
    async def swallowing_call() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise nats.errors.TimeoutError from None

    turns = 0

    async def background() -> None:
        nonlocal turns
        while not cancel_requested():
            turns += 1
            with contextlib.suppress(nats.errors.TimeoutError):
                await swallowing_call()

    task = asyncio.create_task(background())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 2)
    assert task.done() and turns == 1
