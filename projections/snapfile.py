"""A projection snapshot as bytes: made from a database file, checked, and unpacked back into
one. Blocking work on files (copying, compressing, hashing): run it in a thread.

Layout: ``LBPS``, the header's length (4 bytes, big-endian), the :class:`Header` (msgpack),
then the body: the database file as ``VACUUM INTO`` wrote it, zlib-compressed. The header
names the body's sha256, so a damaged or altered body is found before it is decompressed.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from ledgerbus.projections.db import SCHEMA_VERSION
from ledgerbus.projections.errors import SnapshotRejected
from ledgerbus.projections.writer import TRACKING_NAME

FORMAT = 1
"""The snapshot format this version writes and reads; a snapshot of another is passed over."""

_MAGIC = b"LBPS"
_PREFIX = struct.Struct(">4sI")
_MAX_HEADER = 64 * 1024
_CHUNK = 1 << 20
_LEVEL = 1
"""zlib's fastest level: a projection file shrinks to a fifth or so at it, and the slower
levels save a few per cent more for several times the CPU."""


class Header(msgspec.Struct, kw_only=True, frozen=True):
    """What a snapshot says about itself, checked before its body is used."""

    version: int
    """:data:`FORMAT`."""
    schema: int
    """The projection schema version of the database (``PRAGMA user_version``)."""
    position: int
    """The last AUDIT record applied: the database's tracking row."""
    record_hash: str
    """The hash of AUDIT record ``position``: the snapshot's tie to the log."""
    newest_at: str | None
    """The time of the newest record in the database's ``audit_index`` (for ``--until``)."""
    memory_list_cap: int
    """The memory list cap the database was built with (part of what it means)."""
    db_bytes: int
    """The size of the database file."""
    digest: str
    """sha256 (hex) of the compressed body."""


class _Version(msgspec.Struct):
    version: int


_encode = msgspec.msgpack.Encoder().encode
_decode_version = msgspec.msgpack.Decoder(_Version).decode
_decode_header = msgspec.msgpack.Decoder(Header).decode


@dataclass(frozen=True, slots=True)
class Copy:
    """A consistent copy of a projection database and what it holds."""

    path: Path
    position: int
    schema: int
    memory_list_cap: int
    newest_at: str | None


def copy(source: Path, dest: Path) -> Copy:
    """``VACUUM INTO`` ``dest`` through a read-only connection of its own: one read
    transaction's view, so tables and tracking row agree, while a writer goes on
    committing. The copy is left in rollback-journal mode, a file complete by itself."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None, timeout=30)
    try:
        src.execute("VACUUM INTO ?", (str(dest),))
    finally:
        src.close()
    conn = sqlite3.connect(dest, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE").fetchall()
        return Copy(dest, *_facts(conn), newest_at=conn.execute("SELECT max(at) FROM audit_index").fetchone()[0])
    finally:
        conn.close()


def _facts(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(position, schema version, memory list cap) of an open projection database."""
    schema = conn.execute("PRAGMA user_version").fetchone()[0]
    row = conn.execute("SELECT position FROM tracking WHERE name = ?", (TRACKING_NAME,)).fetchone()
    cap = conn.execute("SELECT value FROM meta WHERE name = 'memory_list_cap'").fetchone()
    return (int(row[0]) if row else 0), int(schema), (int(cap[0]) if cap else 0)


def seal(made: Copy, record_hash: str, body: Path) -> bytes:
    """Compress the copy into ``body``; return the header that goes before it."""
    h = hashlib.sha256()
    z = zlib.compressobj(_LEVEL)
    with made.path.open("rb") as src, body.open("wb") as out:
        while chunk := src.read(_CHUNK):
            part = z.compress(chunk)
            h.update(part)
            out.write(part)
        part = z.flush()
        h.update(part)
        out.write(part)
    return pack_header(Header(version=FORMAT, schema=made.schema, position=made.position, record_hash=record_hash,
                              newest_at=made.newest_at, memory_list_cap=made.memory_list_cap,
                              db_bytes=made.path.stat().st_size, digest=h.hexdigest()))


def pack_header(header: Header) -> bytes:
    """The bytes a snapshot starts with: the prefix and the encoded header."""
    raw = _encode(header)
    return _PREFIX.pack(_MAGIC, len(raw)) + raw


def read_header(stored: BinaryIO) -> Header:
    """The header at the start of ``stored``, which is left at the body's first byte;
    :class:`SnapshotRejected` for one that does not decode or is of another format."""
    prefix = stored.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[:4] != _MAGIC:
        raise SnapshotRejected("it does not decode: not a projection snapshot")
    _, size = _PREFIX.unpack(prefix)
    raw = stored.read(size) if size <= _MAX_HEADER else b""
    if not raw or len(raw) != size:
        raise SnapshotRejected(f"it does not decode: a header of {size} bytes")
    try:
        version = _decode_version(raw).version
    except msgspec.DecodeError as exc:
        raise SnapshotRejected(f"it does not decode: {exc}") from exc
    if version != FORMAT:
        raise SnapshotRejected(f"format version {version}, this projector reads version {FORMAT}")
    try:
        return _decode_header(raw)
    except msgspec.DecodeError as exc:
        raise SnapshotRejected(f"it does not decode: {exc}") from exc


def check_header(header: Header, memory_list_cap: int | None) -> None:
    """What the header alone tells: the schema version, and the memory list cap asked for
    (``None``: any)."""
    if header.schema != SCHEMA_VERSION:
        raise SnapshotRejected(f"projection schema v{header.schema}; this is v{SCHEMA_VERSION}")
    if memory_list_cap is not None and header.memory_list_cap != memory_list_cap:
        raise SnapshotRejected(f"built with memory_list_cap={header.memory_list_cap}; the settings say {memory_list_cap}")


def unpack(stored: Path, dest: Path) -> Header:
    """Check the snapshot in the file ``stored`` (header, body digest, body) and write its
    database to ``dest``; :class:`SnapshotRejected` naming the first check that fails."""
    with stored.open("rb") as f:
        header = read_header(f)
        start = f.tell()
        h = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if h.hexdigest() != header.digest:
            raise SnapshotRejected("its body does not hash to its digest (altered or damaged)")
        f.seek(start)
        z = zlib.decompressobj()
        try:
            with dest.open("wb") as out:
                while chunk := f.read(_CHUNK):
                    out.write(z.decompress(chunk))
                out.write(z.flush())
        except zlib.error as exc:
            raise SnapshotRejected(f"its body does not decompress: {exc}") from exc
        if not z.eof:
            raise SnapshotRejected("its body does not decompress: it is cut short")
    _check_db(dest, header)
    return header


def _check_db(path: Path, header: Header) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise SnapshotRejected(f"its database does not check: {'; '.join(problems[:3])}")
            position, schema, cap = _facts(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SnapshotRejected(f"its body is not a projection database: {exc}") from exc
    if (position, schema, cap) != (header.position, header.schema, header.memory_list_cap):
        raise SnapshotRejected(
            f"its database is at seq {position} (schema v{schema}, memory_list_cap={cap}), its header says seq "
            f"{header.position} (schema v{header.schema}, memory_list_cap={header.memory_list_cap})")
