"""An old reader against a newer record: every reader of the log stops at a record it cannot
decode and names it (its sequence, the JSON path, and that a newer ledgerbus wrote it),
instead of skipping it, so no two readers of one log can differ in silence.

The newer record is made as a newer router would make it: the same record with a field its
schema grew, sealed into the chain by the same rule (canonical JSON with ``hash`` empty).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from ledgerbus.bus import chain, codec, subjects
from ledgerbus.bus.errors import UnreadableRecord
from ledgerbus.bus.events import Budget, RetryPolicy, TaskSubmitted, new_id
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.projector import Projector
from ledgerbus.projections.rebuild import rebuild
from ledgerbus.router.app import Router
from ledgerbus.router.errors import LogUnreadableError
from tests.conftest import RunningRouter
from tests.support import Procs, agentctl, audit_records, send, wait_for_records

Connect = Callable[[str], Awaitable[Client]]
Doc = dict[str, Any]


def record(seq: int, task_id: str, **event: Any) -> AuditRecord:
    """An accepted submission as the router records it."""
    msg_id = new_id()
    return AuditRecord(seq=seq, at=datetime.now(UTC), verdict="accepted", code="ok", reason="", principal="cli-alice",
                       kind="task_submitted", key=task_id, msg_id=msg_id, ingress_seq=seq, delivery=1,
                       event=TaskSubmitted(id=msg_id, task_id=task_id, skill="echo", **event))


def grown(rec: AuditRecord, where: tuple[str, ...], name: str, value: Any) -> Doc:
    """``rec`` as a newer schema writes it: the struct at ``where`` has grown a field
    ``name`` (a new field goes last, as msgspec encodes a subclass's fields)."""
    doc: Doc = msgspec.to_builtins(rec)
    part = doc
    for key in where:
        part = part[key]
    part[name] = value
    return doc


def seal(doc: Doc, prev_hash: str) -> tuple[bytes, str]:
    """What :func:`bus.chain.seal` does, for a record this version has no struct for:
    the stored bytes and the record's hash."""
    doc = {**doc, "prev_hash": prev_hash, "hash": ""}
    digest = hashlib.sha256(bytes.fromhex(prev_hash) + msgspec.json.encode(doc)).hexdigest()
    return msgspec.json.encode({**doc, "hash": digest}), digest


def test_the_hand_sealed_record_is_byte_for_byte_what_the_router_stores() -> None:
    # So the newer records below differ from a real router's only by the field they grew.
    rec = record(1, "t1", budget=Budget(tokens=5))
    _, stored = chain.seal(rec, chain.GENESIS)
    assert seal(msgspec.to_builtins(chain.seal(rec, chain.GENESIS)[0]), chain.GENESIS)[0] == stored


# Where a struct sits in a submission's record, and the fields it has there.
STRUCTS = {
    (): set(AuditRecord.__struct_fields__),
    ("event",): {"kind", *TaskSubmitted.__struct_fields__},
    ("event", "budget"): set(Budget.__struct_fields__),
    ("event", "retry"): set(RetryPolicy.__struct_fields__),
}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@given(
    where=st.sampled_from(sorted(STRUCTS)),
    name=st.from_regex(r"[a-z][a-z0-9_]{0,24}", fullmatch=True),
    value=JSON,
    seq=st.integers(1, 2**53),
)
def test_a_field_a_newer_schema_added_anywhere_is_named_never_dropped(
    where: tuple[str, ...], name: str, value: Any, seq: int
) -> None:
    if name in STRUCTS[where]:
        name = f"{name}_new"
    rec = record(seq, "t1", budget=Budget(tokens=5), retry=RetryPolicy(max_attempts=2))
    data, _ = seal(grown(rec, where, name, value), chain.GENESIS)
    with pytest.raises(UnreadableRecord) as caught:
        codec.read_record(seq, data)
    error = caught.value
    assert (error.seq, error.newer, error.problem.kind) == (seq, True, "unknown_field")
    path = ".".join(("$", *where))
    assert str(error).startswith(f"AUDIT seq {seq} cannot be read: unknown field `{name}` - at `{path}`")
    assert "newer ledgerbus: upgrade this process" in str(error)
    with pytest.raises(UnreadableRecord):
        chain.verify([(seq, data)], chain.ChainHead(seq - 1, chain.GENESIS))


@pytest.mark.parametrize(("where", "value", "path"), [
    (("event", "kind"), "task_teleported", "$.event.kind"),  # an event kind added
    (("verdict",), "quarantined", "$.verdict"),  # a value added to a Literal
])
def test_a_kind_or_value_a_newer_schema_added_is_named(where: tuple[str, ...], value: str, path: str) -> None:
    doc: Doc = msgspec.to_builtins(record(4, "t1"))
    part = doc
    for key in where[:-1]:
        part = part[key]
    part[where[-1]] = value
    with pytest.raises(UnreadableRecord, match="newer ledgerbus") as caught:
        codec.read_record(4, seal(doc, chain.GENESIS)[0])
    assert caught.value.problem.path == path and caught.value.seq == 4


def test_bytes_that_are_no_record_are_named_as_damaged_not_newer() -> None:
    _, data = chain.seal(record(1, "t1"), chain.GENESIS)
    with pytest.raises(UnreadableRecord, match="damaged") as caught:
        codec.read_record(1, data[:-7])
    assert caught.value.seq == 1 and not caught.value.newer


async def a_log_a_newer_router_wrote_on(running_router: RunningRouter, connect_as: Connect, admin: Client) -> int:
    """Two submissions through the real router; then a newer router appends a submission
    whose event carries ``future_field``, and one more an old reader can read. Returns
    the newer record's sequence."""
    cli = await connect_as("cli")
    for task_id in ("old-1", "old-2"):
        await send(cli, "cli", "alice", TaskSubmitted(id=new_id(), task_id=task_id, skill="echo"))
    await wait_for_records(admin.jetstream(), 2)
    await running_router.stop()
    last = (await audit_records(admin.jetstream()))[-1]
    writer = (await connect_as("router")).jetstream()
    newer, newer_hash = seal(grown(record(last.seq + 1, "new-1"), ("event",), "future_field", {"x": 1}), last.hash)
    await writer.publish(subjects.audit("accepted", "task_submitted", "new-1"), newer,
                         headers={subjects.HDR_EXPECTED_LAST_SEQ: str(last.seq)})
    _, after = chain.seal(record(last.seq + 2, "new-2"), newer_hash)
    await writer.publish(subjects.audit("accepted", "task_submitted", "new-2"), after,
                         headers={subjects.HDR_EXPECTED_LAST_SEQ: str(last.seq + 1)})
    return last.seq + 1


async def projected(path: Path) -> tuple[int, list[str]]:
    """The tracking position of the projection at ``path`` and the tasks it holds."""
    db = await dbmod.open_reader(path)
    try:
        async with db.execute("SELECT task_id FROM tasks ORDER BY task_id") as cur:
            return await dbmod.position(db), [row[0] for row in await cur.fetchall()]
    finally:
        await db.close()


async def test_an_old_projector_stops_at_a_newer_record_and_does_not_move_past_it(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path
) -> None:
    seq = await a_log_a_newer_router_wrote_on(running_router, connect_as, admin)
    live = tmp_path / "live.db"
    for _ in range(2):  # and again after a restart: it never skips the record
        projector = Projector(await connect_as("projector"), settings, live)
        with pytest.raises(UnreadableRecord) as caught:
            await asyncio.wait_for(projector.run(asyncio.Event()), timeout=30)
        assert caught.value.seq == seq and caught.value.problem.path == "$.event"
        assert "unknown field `future_field`" in str(caught.value)
        assert projector.position == seq - 1
        assert await projected(live) == (seq - 1, ["old-1", "old-2"])

    with pytest.raises(UnreadableRecord, match=f"AUDIT seq {seq} cannot be read"):
        await rebuild(admin.jetstream(), tmp_path / "rebuilt.db")
    assert not (tmp_path / "rebuilt.db").exists()  # no half rebuild left to be mistaken for one
    assert await rebuild(admin.jetstream(), tmp_path / "before.db", until_seq=seq - 1) == seq - 1
    assert await projected(tmp_path / "before.db") == await projected(live)


async def test_agentctl_projector_replay_and_verify_name_the_newer_record(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings, tmp_path: Path,
    procs: Procs,
) -> None:
    seq = await a_log_a_newer_router_wrote_on(running_router, connect_as, admin)
    message = f"AUDIT seq {seq} cannot be read: unknown field `future_field` - at `$.event`"

    projector = await procs.start("projector", "projector", "--db", str(tmp_path / "live.db"))
    async with asyncio.timeout(60):
        code = await projector.proc.wait()
    stderr = projector.log.read_text()
    assert code != 0 and message in stderr and "upgrade this process" in stderr
    assert "Traceback" not in stderr
    assert projector.logged("audit_record_unreadable")

    code, _, err = await agentctl(settings, "replay", "--db", str(tmp_path / "replayed.db"))
    assert code != 0 and message in err  # agentctl() asserts there is no traceback
    assert not (tmp_path / "replayed.db").exists()

    code, out, err = await agentctl(settings, "audit", "verify", "--json", "--no-projections")
    report = msgspec.json.decode(out)
    assert code == 1 and report["first_bad_seq"] == seq
    assert message in report["problem"] and "newer ledgerbus" in report["problem"]


async def test_an_old_router_refuses_to_serve_a_log_with_a_newer_record(
    running_router: RunningRouter, connect_as: Connect, admin: Client, settings: Settings
) -> None:
    seq = await a_log_a_newer_router_wrote_on(running_router, connect_as, admin)
    router = Router(await connect_as("router"), settings)
    with pytest.raises(LogUnreadableError) as caught:
        await router.start()
    assert str(caught.value).startswith(f"refusing to serve: AUDIT seq {seq} cannot be read: unknown field")
    assert "newer ledgerbus: upgrade this process" in str(caught.value)
