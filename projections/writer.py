"""The projection writer: a child process that executes plans on the projection database.

SQLite binds every row of an ``executemany`` holding Python's GIL, so a writer thread
and a folding thread in one process take turns on one core, and each waits out the
other's switch interval: measured, that is slower than no overlap at all. A process has
its own GIL: the projector folds batch *n + 1* while this process writes batch *n*.

Protocol, over the child's stdin and stdout: frames of a 4-byte big-endian length and
a msgpack body. The parent sends ``[position, [[sql, [params, ...]], ...]]``; the child
runs the statements and the tracking row (``position``) in one transaction and answers
``[position, null]``, or ``[position, "what went wrong"]`` and exits. It answers
``[-1, null]`` once the database is open. End of input (the parent closed the pipe, or
died) ends the child; a plan half received is never applied.

Run as ``python -m projections.writer PATH`` (by :class:`projections.pipeline.Writer`);
it imports little, so it starts fast.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import sys
from typing import IO, Any

import msgspec

from ledgerbus.bus import failpoints
from ledgerbus.bus.errors import ConfigError

HEADER = struct.Struct(">I")
READY = -1
BACKSTOP_PAGES = 10_000
"""WAL pages after which the writer checkpoints on its own (40 MB at 4 KiB pages): the
projector's :class:`~projections.pipeline.Checkpointer` normally does it first."""
TRACKING_NAME = "audit"
SQL_SET_POSITION = (
    f"INSERT INTO tracking (name, position) VALUES ('{TRACKING_NAME}', ?) "
    "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)


def read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame's body, or ``None`` at end of input (a partial frame counts as the end)."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


def write_frame(stream: IO[bytes], body: bytes) -> None:
    stream.write(HEADER.pack(len(body)) + body)
    stream.flush()


def _execute(conn: sqlite3.Connection, position: int, steps: list[list[Any]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in steps:
            conn.executemany(sql, params)
        conn.execute(SQL_SET_POSITION, (position,))
        # The projector is this process and its parent: a crash here kills both.
        failpoints.reached("projector.applied", also=os.getppid())
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def main(argv: list[str]) -> int:
    """Apply the plans read from stdin to the database ``argv[0]``, answering on stdout."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    # Its life is the projector's pipe: a Ctrl-C or SIGTERM for the process group is the
    # projector's to handle, which closes the pipe once what it handed over is committed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        failpoints.arm(os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"projection writer: {exc}\n")
        return 2
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(tuple[int, list[tuple[str, list[tuple[Any, ...]]]]]).decode
    try:
        conn = sqlite3.connect(argv[0], isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        # The parent checkpoints beside this process (Checkpointer); this is the backstop.
        conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
    except sqlite3.Error as exc:
        write_frame(out, encode([READY, f"cannot open {argv[0]}: {exc}"]))
        return 1
    write_frame(out, encode([READY, None]))
    while (body := read_frame(inp)) is not None:
        position, steps = decode(body)
        try:
            _execute(conn, position, steps)  # type: ignore[arg-type]
        except sqlite3.Error as exc:
            write_frame(out, encode([position, f"applying up to AUDIT {position}: {exc}"]))
            return 1
        write_frame(out, encode([position, None]))
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
