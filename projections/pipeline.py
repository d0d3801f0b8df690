"""The projector's end of the writer process (:mod:`projections.writer`): starting it,
handing it plans, reading its answers, and checkpointing the WAL beside it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import msgspec

from ledgerbus.projections.errors import DatabaseError
from ledgerbus.projections.rows import Plan
from ledgerbus.projections.writer import HEADER, read_frame

PIPE_SIZE = 1 << 20


class Checkpointer:
    """Copies the WAL into the database file from a thread of the parent process, so the
    writer's commits do not wait for it.

    With SQLite's default, the commit that takes the WAL past 1,000 pages also copies
    them into the file and syncs it: measured, a sixth of a rebuild's writing. A
    ``PASSIVE`` checkpoint from another connection runs while the writer appends (it
    copies what is committed and leaves the rest), and holds no GIL while it works.
    """

    def __init__(self, path: Path, interval_s: float = 0.05) -> None:
        self.path = path
        self.interval_s = interval_s
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="projection-checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Something was committed: checkpoint soon."""
        self._wanted.set()

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the writer's backstop checkpoints instead
        try:
            while True:
                self._wanted.wait()
                if self._stopping:
                    return
                self._wanted.clear()
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                time.sleep(self.interval_s)
        finally:
            conn.close()


def _widen(pipe: IO[bytes] | None) -> None:
    """Make the pipe hold a whole plan (on Linux, up to ``fs.pipe-max-size``): a plan then
    goes over in one write, where a 64 KiB pipe takes one write and one handover of the
    GIL per 64 KiB, each a wait for the folding thread."""
    if pipe is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class Writer:
    """The parent's end: starts the child, sends it plans, reads its answers.

    Frames go to the child from a thread, so handing a plan over never waits for the
    child to finish the one before (a plan may be larger than the pipe holds).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_flight = 0
        """Plans sent and not yet answered."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(tuple[int, str | None]).decode
        self._checkpointer: Checkpointer | None = None

    async def start(self) -> None:
        """Start the child and wait until it has the database open."""
        self._proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "ledgerbus.projections.writer", str(self.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        _widen(self._proc.stdin)
        self._sender = threading.Thread(target=self._send_loop, name="projection-writer-sender", daemon=True)
        self._sender.start()
        try:
            await self._answer()
        except BaseException:
            await self.kill()
            raise
        self._checkpointer = Checkpointer(self.path)
        self._checkpointer.start()

    def _send_loop(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        try:
            while (frame := self._outbox.get()) is not None:
                stdin.write(frame)
                stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the child is gone: the next answer says how
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    async def send(self, plan: Plan) -> None:
        """Hand ``plan`` to the child (it runs once the plans before it are done)."""
        if self._proc is None:
            raise DatabaseError("the projection writer is not running")
        body = self._encode([plan.position, plan.steps])
        self._outbox.put(HEADER.pack(len(body)) + body)
        self.in_flight += 1

    async def acked(self) -> int:
        """Wait for the oldest plan in flight to commit; return its position.

        Raises :class:`DatabaseError` if it failed or the child died.
        """
        position = await self._answer()
        self.in_flight -= 1
        if self._checkpointer is not None:
            self._checkpointer.poke()
        return position

    async def _answer(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        body = await asyncio.to_thread(read_frame, self._proc.stdout)
        if body is None:
            code = await asyncio.to_thread(self._proc.wait)
            self._proc.stdout.close()
            self._proc = None
            raise DatabaseError(f"the projection writer for {self.path} died (exit {code})")
        position, error = self._decode(body)
        if error is not None:
            raise DatabaseError(error)
        return position

    async def stop(self) -> None:
        """Wait for the plans in flight, then end the child."""
        try:
            while self.in_flight and self._proc is not None:
                await self.acked()
        finally:
            await self.kill(gently=True)

    async def kill(self, gently: bool = False) -> None:
        """End the child: by closing its input (``gently``, it finishes what it read), or
        with SIGKILL (a plan it is applying is rolled back)."""
        proc, self._proc = self._proc, None
        self._outbox.put(None)
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await asyncio.to_thread(checkpointer.stop)
        if proc is None:
            return
        if not gently:
            proc.kill()
        await asyncio.to_thread(proc.wait)
        if proc.stdout is not None:
            proc.stdout.close()
        self.in_flight = 0
