"""Writing one archive segment, in a process of its own (``python -m ledgerbus.router.segments``).

Reading ten thousand records from AUDIT, checking their chain and compressing them is CPU
work; done on the router's event loop it competed with routing and, under a steady load,
archived more slowly than records arrived (measured in the soak: 8 to 15 s a segment while
the router routed 1,200 messages a second, so AUDIT outgrew its bound). The child does it
on another core with its own connection, as the router, and tells the parent what it wrote;
the parent signs its seal (the key never leaves the router) and records it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import msgspec

from ledgerbus.bus import chain, follow, subjects
from ledgerbus.bus.archive import Archive, ArchiveError
from ledgerbus.bus.chain import ChainHead
from ledgerbus.bus.connection import connect
from ledgerbus.bus.errors import ChainError, UnreadableRecord
from ledgerbus.bus.records import ArchiveSeal
from ledgerbus.bus.settings import Settings


class Outcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The child's answer, one JSON line on its stdout: the segment's seal, not yet signed
    (the key never leaves the router), or why it could not write it."""

    seal: ArchiveSeal | None = None
    error: str = ""


async def write(js: object, archive: Archive, first: int, last: int, head: ChainHead) -> ArchiveSeal:
    """Read records ``first..last`` from AUDIT, each checked to extend the chain from
    ``head``, and write them as one segment of ``archive``."""
    records: list[tuple[int, bytes]] = []
    first_at = last_at = None
    prev_hash = head.hash
    async for msg in follow.messages(js, subjects.AUDIT_STREAM, subjects.AUDIT_ALL, first, idle=5.0):  # type: ignore[arg-type]
        seq = msg.metadata.sequence.stream
        if seq != head.seq + 1:
            raise ArchiveError(f"AUDIT gave seq {seq} after {head.seq} while archiving {first}..{last}")
        record, head = chain.verify_next(seq, msg.data, head)
        first_at = first_at or record.at
        last_at = record.at
        records.append((seq, msg.data))
        if seq == last:
            break
    if head.seq != last or first_at is None or last_at is None:
        raise ArchiveError(f"AUDIT ended at seq {head.seq} while archiving {first}..{last}")
    name, sha256, size = await asyncio.to_thread(archive.write_segment, records)
    return ArchiveSeal(file=name, first_seq=first, last_seq=last, first_at=first_at, last_at=last_at,
                       prev_hash=prev_hash, last_hash=head.hash, sha256=sha256, bytes=size)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that gives the child the router's server and credentials."""
    env = dict(os.environ)
    env.update(LEDGERBUS_URL=",".join(settings.servers), LEDGERBUS_AUTH_DIR=str(settings.auth_dir),
               LEDGERBUS_CONNECT_TIMEOUT_S=str(settings.connect_timeout_s), LEDGERBUS_LOG_LEVEL="warning")
    if settings.user:
        env["LEDGERBUS_USER"] = settings.user
    if settings.password:
        env["LEDGERBUS_PASSWORD"] = settings.password
    return env


async def in_child(settings: Settings, archive: Archive, first: int, last: int, head: ChainHead) -> ArchiveSeal:
    """:func:`write`, run by a child process; :class:`ArchiveError` with its error if it fails."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.router.segments", str(archive.path), str(first), str(last),
        str(head.seq), head.hash, env=child_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    lines = out.strip().rsplit(b"\n", 1)  # the last line: anything logged before it is not the answer
    try:
        outcome = msgspec.json.decode(lines[-1], type=Outcome)
    except msgspec.DecodeError:
        said = err.decode(errors="replace").strip().splitlines()
        raise ArchiveError(f"the segment writer for {first}..{last} failed (exit {proc.returncode}): "
                           f"{said[-1] if said else 'no message'}") from None
    if outcome.seal is None:
        raise ArchiveError(outcome.error or f"the segment writer for {first}..{last} gave no seal")
    return outcome.seal


async def _main(directory: str, first: int, last: int, head_seq: int, head_hash: str) -> int:
    settings = Settings.from_env()
    nc = await connect(settings, "router")
    try:
        outcome = Outcome(seal=await write(nc.jetstream(timeout=30), Archive(Path(directory)), first, last,
                                           ChainHead(head_seq, head_hash)))
    except (ArchiveError, ChainError, UnreadableRecord) as exc:
        outcome = Outcome(error=str(exc))
    finally:
        await nc.close()
    sys.stdout.buffer.write(b"\n" + msgspec.json.encode(outcome) + b"\n")
    return 0 if outcome.seal is not None else 1


if __name__ == "__main__":
    d, a, b, s, h = sys.argv[1:6]
    sys.exit(asyncio.run(_main(d, int(a), int(b), int(s), h)))
