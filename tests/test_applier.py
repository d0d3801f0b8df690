"""The pipelined applier: caches kept between batches, plans committed by a writer process
while the next batch folds, the WAL checkpointed beside it.

The property: whatever the batch sizes, the number of plans in flight and the size of
the caches (down to none), and with the projector restarted between any batches, the
file ends equal to ``apply_batch`` of the whole log in one go. The logs are the same
model of the router the projection properties use. Then what the pipeline adds that can
go wrong on its own: a writer that dies with plans in flight, a plan SQLite refuses, the
fail point inside the writer's transaction, and the checkpointer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections import db as dbmod
from ledgerbus.projections.apply import MAX_DEPTH, Applier
from ledgerbus.projections.errors import DatabaseError
from ledgerbus.projections.rows import Plan
from tests.test_projection_properties import CAP, DrawPicker, RandomPicker, build, build_log, dump_of, project_whole


async def pipelined(path: Path, log: Sequence[AuditRecord], bounds: Sequence[int], restarts: set[int],
                    depth: int, cache_limit: int) -> int:
    """Apply ``log`` cut at ``bounds`` through Appliers, a new one (cold caches, new
    writer) at each batch index in ``restarts``; return how many rows the caches held at
    most."""
    applier = await Applier.open(path, CAP, cache_limit=cache_limit, depth=depth)
    most = 0
    try:
        for i, (start, end) in enumerate(pairwise(bounds)):
            if i in restarts:
                await applier.close()
                applier = await Applier.open(path, CAP, cache_limit=cache_limit, depth=depth)
                assert applier.committed == start, "a graceful close commits everything handed over"
            await applier.submit(log[start:end])
            assert applier.position == end
            assert applier.writer.in_flight <= depth
            if applier._state is not None:
                most = max(most, applier._state.cached())
        assert await applier.drain() == len(log)
    finally:
        await applier.close()
    return most


@st.composite
def cuts(draw: st.DrawFn, n: int) -> list[int]:
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(bounds[-1] + draw(st.integers(1, min(n - bounds[-1], 8))))
    return bounds


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[AuditRecord], list[int], set[int], int, int]:
    log = build(DrawPicker(draw), draw(st.integers(1, 40))).records
    bounds = draw(cuts(len(log)))
    restarts = draw(st.sets(st.integers(1, max(1, len(bounds) - 2)), max_size=2))
    return log, bounds, restarts, draw(st.integers(1, MAX_DEPTH)), draw(st.sampled_from([0, 1, 3, 50_000]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_pipelined_batches_give_the_projection_of_the_whole_log(
    scenario: tuple[list[AuditRecord], list[int], set[int], int, int],
) -> None:
    log, bounds, restarts, depth, cache_limit = scenario

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            whole = await project_whole(Path(tmp) / "whole.db", log)
            most = await pipelined(Path(tmp) / "piped.db", log, bounds, restarts, depth, cache_limit)
            assert await dump_of(Path(tmp) / "piped.db") == whole
            if cache_limit == 0:
                event("caches trimmed to the uncommitted rows")
            event(f"depth {'1' if depth == 1 else '2-4' if depth <= 4 else '5+'}; most rows cached {most // 10 * 10}+")

    asyncio.run(check())


@pytest.mark.parametrize(("depth", "cache_limit"), [(1, 50_000), (4, 0), (16, 2)])
async def test_seeded_logs_pipelined(tmp_path: Path, depth: int, cache_limit: int) -> None:
    """Longer logs than Hypothesis draws, in batches of 1 to 8, including restores of
    checkpoints saved in batches still in flight."""
    for seed in range(3):
        log = build_log(RandomPicker(seed), 120)
        whole = await project_whole(tmp_path / f"whole-{seed}.db", log)
        rnd = RandomPicker(seed + 100).rng
        bounds = [0]
        while bounds[-1] < len(log):
            bounds.append(min(len(log), bounds[-1] + rnd.randint(1, 8)))
        await pipelined(tmp_path / f"piped-{seed}-{depth}.db", log, bounds, {len(bounds) // 2}, depth, cache_limit)
        assert await dump_of(tmp_path / f"piped-{seed}-{depth}.db") == whole, f"seed {seed}"


async def test_a_writer_killed_with_plans_in_flight_loses_only_uncommitted_batches(tmp_path: Path) -> None:
    """kill -9 of the writer: the next wait says so; the file holds whole batches, its
    tracking row names the last one, and carrying on from there gives the same file."""
    log = build_log(RandomPicker(7), 150)
    whole = await project_whole(tmp_path / "whole.db", log)
    path = tmp_path / "p.db"
    applier = await Applier.open(path, CAP, depth=8)
    try:
        for start in range(0, 40, 5):
            await applier.submit(log[start : start + 5])
        assert applier.writer._proc is not None
        applier.writer._proc.send_signal(signal.SIGKILL)
        with pytest.raises(DatabaseError, match="projection writer .* died"):
            for start in range(40, len(log), 5):
                await applier.submit(log[start : start + 5])
            await applier.drain()
    finally:
        await applier.writer.kill()
        await applier.reader.close()
    reopened = await Applier.open(path, CAP)
    try:
        committed = reopened.committed
        assert committed % 5 == 0 and committed <= applier.position, "whole batches only"
        db = await dbmod.open_reader(path)
        try:
            # Every record up to the tracking row is indexed, but those an archive record
            # among them let go of (the log builder archives too).
            cut = max((r.retention.through_seq for r in log[:committed]
                       if r.retention is not None and r.retention.action == "archived"), default=0)
            assert [row[0] for row in (await dbmod.dump(db))["audit_index"]] == list(range(cut + 1, committed + 1))
        finally:
            await db.close()
        await reopened.submit(log)  # the records up to `committed` are skipped
        assert await reopened.drain() == len(log)
    finally:
        await reopened.close()
    assert await dump_of(path) == whole


async def test_a_plan_sqlite_refuses_is_an_error_naming_it_and_commits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    applier = await Applier.open(path, CAP)
    try:
        log = build_log(RandomPicker(3), 20)
        await applier.submit(log)
        assert await applier.drain() == len(log)
        bad = Plan(len(log) + 1)
        bad.add("INSERT INTO tracking (name, position) VALUES ('other', 1)")
        bad.add("INSERT INTO no_such_table VALUES (1)")
        await applier.writer.send(bad)
        with pytest.raises(DatabaseError, match=rf"applying up to AUDIT {len(log) + 1}: no such table: no_such_table"):
            await applier.drain()
    finally:
        await applier.writer.kill()
        await applier.reader.close()
    db = await dbmod.open_reader(path)
    try:
        assert await dbmod.position(db) == len(log)
        assert (await dbmod.dump(db))["tracking"] == [("audit", len(log))], "nothing of the refused plan"
    finally:
        await db.close()


async def test_the_failpoint_in_the_writers_transaction_kills_the_projector_with_it(tmp_path: Path) -> None:
    """``projector.applied=kill@3``: the writer dies inside its third transaction and takes
    its parent along (both are the projector); the file holds the first two batches."""
    path = tmp_path / "p.db"
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from ledgerbus.projections.apply import Applier
        from tests.test_projection_properties import CAP, RandomPicker, build_log

        async def main():
            log = build_log(RandomPicker(5), 60)
            applier = await Applier.open(Path({str(path)!r}), CAP)
            for start in range(0, len(log), 4):
                await applier.submit(log[start:start + 4])
                await applier.drain()
            print("survived")

        asyncio.run(main())
    """)
    env = {**os.environ, "LEDGERBUS_FAILPOINTS": "projector.applied=kill@3"}
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], env=env, capture_output=True,
                                   text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "survived" not in proc.stdout
    db = await dbmod.open_reader(path)
    try:
        assert await dbmod.position(db) == 8
    finally:
        await db.close()


async def test_the_checkpointer_copies_the_wal_into_the_file_while_the_writer_goes_on(tmp_path: Path) -> None:
    """Far below the writer's own 10,000-page backstop, the database file grows: the
    parent's checkpoints copy the WAL into it."""
    path = tmp_path / "p.db"
    async with await Applier.open(path, CAP) as applier:
        empty = path.stat().st_size
        log = build_log(RandomPicker(11), 400)
        for start in range(0, len(log), 10):
            await applier.submit(log[start : start + 10])
        await applier.drain()
        for _ in range(100):
            if path.stat().st_size > empty + 64 * 1024:
                break
            await asyncio.sleep(0.05)
        assert path.stat().st_size > empty + 64 * 1024, "nothing checkpointed into the file"


def test_iso_is_isoformat() -> None:
    """The fast timestamp text is exactly ``isoformat(timespec="microseconds")``."""

    @settings(max_examples=2000, deadline=None)
    @given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                   timezone(timedelta(seconds=-3725))]) | st.none()))
    def check(at: datetime) -> None:
        assert dbmod.iso.__wrapped__(at) == at.isoformat(timespec="microseconds")

    check()


async def test_the_writer_leaves_signals_to_the_projector_and_ends_with_it(tmp_path: Path) -> None:
    """A Ctrl-C for the process group does not kill the writer mid-plan (the projector
    handles it); a projector that dies without a word closes the pipe, and the writer ends."""
    path = tmp_path / "p.db"
    async with await Applier.open(path, CAP) as applier:
        assert applier.writer._proc is not None
        applier.writer._proc.send_signal(signal.SIGINT)
        applier.writer._proc.send_signal(signal.SIGTERM)
        log = build_log(RandomPicker(2), 30)
        await applier.submit(log)
        assert await applier.drain() == len(log)
    script = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from ledgerbus.projections.apply import Applier

        async def main():
            applier = await Applier.open(Path({str(tmp_path / "q.db")!r}), 4)
            print(applier.writer._proc.pid, flush=True)
            os._exit(3)

        asyncio.run(main())
    """)
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
                                   timeout=60, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 3, proc.stderr
    pid = int(proc.stdout.strip())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the writer outlived its projector")


async def test_a_writer_that_cannot_open_the_file_says_which(tmp_path: Path) -> None:
    from ledgerbus.projections.pipeline import Writer

    writer = Writer(tmp_path / "no such dir" / "p.db")
    with pytest.raises(DatabaseError, match="cannot open .*no such dir/p.db"):
        await writer.start()
    assert writer._proc is None and writer._checkpointer is None, "nothing left running"
