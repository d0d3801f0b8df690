"""``python -m bench.paired``: one task at a time, ledgerbus beside Celery, paired.

The e2e bench (``bench/e2e.py``) starts each system afresh for each round, one after the
other; on a shared two-core machine one configuration's p50 moves 2.5-4.2 ms between
rounds, more than the differences worth measuring here. This keeps both up at once (the
project as shipped by ``honcho start``, as the e2e bench starts it, and Celery with Redis,
as ``bench/celery_side.py`` starts it) and sends their lone tasks in alternating blocks
(ledgerbus first in one pair, Celery first in the next), so that the machine's drift falls
on both alike. It reports each side's p50 and p99 over all its tasks, their ratio, and the
median of the block pairs' own ratios.

    python -m bench.paired                    # 1,000 lone tasks a side, blocks of 50
    python -m bench.paired --untraced         # ledgerbus with OTEL_SDK_DISABLED=true
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bench import celery_side, e2e
from bench.common import WARMUP, BenchError, percentile
from ledgerbus.bus import subjects
from ledgerbus.bus.connection import connect

REPO = Path(__file__).resolve().parent.parent


def summary(ledgerbus: list[list[float]], celery: list[list[float]]) -> dict[str, Any]:
    """Each side's p50 and p99 over all its tasks (ms), the ratio of the p50s, and the
    median of the block pairs' ratios of p50s (a pair: the two systems' blocks in turn)."""
    if not ledgerbus or len(ledgerbus) != len(celery):
        raise ValueError("one block of each system per pair, at least one pair")
    lb = [t for block in ledgerbus for t in block]
    cel = [t for block in celery for t in block]
    pairs = [statistics.median(a) / statistics.median(b) for a, b in zip(ledgerbus, celery, strict=True)]
    return {
        "ledgerbus_p50_ms": statistics.median(lb) * 1000, "ledgerbus_p99_ms": percentile(lb, 99) * 1000,
        "celery_p50_ms": statistics.median(cel) * 1000, "celery_p99_ms": percentile(cel, 99) * 1000,
        "p50_ratio": statistics.median(lb) / statistics.median(cel),
        "pair_ratio_median": statistics.median(pairs), "pair_ratio_min": min(pairs), "pair_ratio_max": max(pairs),
        "pairs": len(pairs), "tasks_each": len(lb),
    }


async def _alternate(system: e2e.System, noop: Any, pairs: int, block: int,
                     say: Callable[[str], None]) -> tuple[list[list[float]], list[list[float]]]:
    cli = await connect(system.settings, e2e.CLI.token)
    js = cli.jetstream(timeout=30)
    loop = asyncio.get_running_loop()
    subject = subjects.ingress(e2e.CLI, "task_submitted")
    await e2e.joined(js, system.agents, timeout=180)
    await e2e.until_quiet(system.dir)
    done = e2e.Completions()
    subs = await e2e.outcomes(js, done)

    async def ledgerbus_task(task_id: str) -> float:
        done.waiting[task_id] = fut = loop.create_future()
        data, headers = e2e.submission(task_id)
        start = time.perf_counter()
        await js.publish(subject, data, headers=headers)
        return await done.until(fut, timeout=60) - start

    def celery_task() -> float:
        # Blocking, as Celery's client is: nothing of ledgerbus's is waiting meanwhile.
        start = time.perf_counter()
        noop.delay().get(timeout=60)
        return time.perf_counter() - start

    try:
        for i in range(WARMUP):
            await ledgerbus_task(f"warm{i}")
            celery_task()
        ledgerbus: list[list[float]] = []
        celery: list[list[float]] = []
        for pair in range(pairs):
            lb_block: list[float] = []
            cel_block: list[float] = []
            for side in ("ledgerbus", "celery") if pair % 2 == 0 else ("celery", "ledgerbus"):
                for i in range(block):
                    if side == "ledgerbus":
                        lb_block.append(await ledgerbus_task(f"p{pair}-{i}"))
                    else:
                        cel_block.append(celery_task())
            ledgerbus.append(lb_block)
            celery.append(cel_block)
            if (pair + 1) % 5 == 0:
                say(f"  {pair + 1} of {pairs} pairs of blocks")
        return ledgerbus, celery
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await cli.close()


BLOCK = 50
"""Lone tasks in a row to one system before the other's turn."""


def pairs_of(tasks: int, block: int) -> int:
    """How many pairs of blocks ``tasks`` lone tasks a side make (whole blocks only)."""
    if tasks < block:
        raise BenchError(f"--tasks {tasks} is fewer than one block of {block} (--block)")
    return tasks // block


def run(repo: Path, tasks: int, block: int, traced: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """``tasks`` lone tasks a side (rounded down to whole blocks), measured paired."""
    pairs = pairs_of(tasks, block)
    notes: list[str] = []
    with celery_side.celery(repo, say, notes) as noop:
        system = e2e.System(repo, traced)
        try:
            system.start()
            ledgerbus, celery = asyncio.run(_alternate(system, noop, pairs, block, say))
        finally:
            notes += system.stop()
            system.close()
    return summary(ledgerbus, celery) | {"block": block, "traced": traced, "notes": notes}


@click.command()
@click.option("--tasks", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Lone tasks a side (whole pairs of blocks).")
@click.option("--block", default=BLOCK, show_default=True, type=click.IntRange(min=1),
              help="Tasks in a row to one system before the other's turn.")
@click.option("--untraced", is_flag=True, help="ledgerbus with OTEL_SDK_DISABLED=true (as shipped otherwise).")
def main(tasks: int, block: int, untraced: bool) -> None:
    """One task at a time, ledgerbus beside Celery, both up at once, blocks alternating."""
    try:
        pairs_of(tasks, block)
    except BenchError as exc:
        raise click.UsageError(str(exc)) from exc
    missing = celery_side.missing()
    if missing is not None:
        raise click.ClickException(f"the Celery side cannot run here: {missing}")
    try:
        found = run(REPO, tasks, block, not untraced, lambda line: click.echo(line, err=True))
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    which = "untraced (OTEL_SDK_DISABLED=true)" if untraced else "as shipped"
    click.echo(f"ledgerbus, {which}: p50 {found['ledgerbus_p50_ms']:.2f} ms, p99 {found['ledgerbus_p99_ms']:.2f} ms")
    click.echo(f"Celery + Redis:     p50 {found['celery_p50_ms']:.2f} ms, p99 {found['celery_p99_ms']:.2f} ms")
    click.echo(f"ledgerbus / Celery, p50: {found['p50_ratio']:.3f} ({found['tasks_each']} tasks a side); "
               f"pairs of blocks of {block}: median {found['pair_ratio_median']:.3f}, "
               f"{found['pair_ratio_min']:.2f}-{found['pair_ratio_max']:.2f} over {found['pairs']}")
    for note in found["notes"]:
        click.echo(f"note: {note}", err=True)


if __name__ == "__main__":
    sys.exit(main())
