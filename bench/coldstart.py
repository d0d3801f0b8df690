"""Router cold start with and without snapshots, as the audit log grows.

One nats-server and one store for the whole run. The log is grown by the real system: a
router (``agentctl router``, snapshots at the default ``LEDGERBUS_SNAPSHOT_EVERY``) and an
``echo`` agent (``agentctl agent``, concurrency 8), both subprocesses, fed no-op ``echo``
tasks pipelined by one CLI client, a window of them at a time (two AUDIT records a task:
its submission and its claim-with-result). At each size asked for, they are stopped
(SIGTERM) and a fresh ``agentctl router`` is started on the store, ``--rounds`` times with
``LEDGERBUS_SNAPSHOT_EVERY=0`` (the whole log folded, as before snapshots) and as many
with the default (the newest snapshot and the tail), alternating; the cold start is the
time from spawning the process to its ``router_started`` log line (Python's start and
imports included), and each start's ``audit_recovered`` line says how long the recovery
itself took and how long the tail was. Medians are reported, and the figures are written
to ``bench/results/coldstart.json``. A standby's takeover runs the same recovery (after
the lease lapses), so it gains what a start gains.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.js.errors

from ledgerbus.bus import codec, subjects
from ledgerbus.bus.connection import connect
from ledgerbus.bus.events import TaskSubmitted, new_id
from ledgerbus.bus.identity import Identity, write_local_config
from ledgerbus.bus.provision import provision
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings

WINDOW = 4000
"""Tasks published before waiting for the system to catch up (WORK discards new messages
when full, so the feed keeps what is outstanding bounded)."""


def _env(settings: Settings, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LEDGERBUS_"))}
    env.update(LEDGERBUS_URL=settings.url, LEDGERBUS_AUTH_DIR=str(settings.auth_dir),
               LEDGERBUS_ROUTER_KEY_PATH=str(settings.router_key_path), LEDGERBUS_POLICY_PATH=str(settings.policy_path),
               LEDGERBUS_DB_PATH=str(tmp / "p.db"), LEDGERBUS_WORKSPACE_ROOT=str(tmp / "ws"),
               LEDGERBUS_LOG_FORMAT="json", PYTHONUNBUFFERED="1", **extra)
    return env


async def _spawn(name: str, args: list[str], env: dict[str, str],
                 tmp: Path) -> tuple[asyncio.subprocess.Process, Path]:
    log = tmp / f"{name}-{time.monotonic_ns()}.log"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ledgerbus.agentctl", *args, env=env, cwd=tmp,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=log.open("wb"))
    return proc, log


def _lines(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _grow(settings: Settings, tmp: Path, target: int, next_task: int,
                say: Callable[[str], None]) -> tuple[int, list[dict[str, Any]]]:
    """Run router and agent until AUDIT holds ``target`` records; the next task number and
    the router's ``snapshot_started`` and ``snapshot_saved`` lines."""
    router, router_log = await _spawn("router", ["router"], _env(settings, tmp), tmp)
    agent, _ = await _spawn("agent", ["agent", "--name", "bench", "--skills", "echo", "--concurrency", "8"],
                            _env(settings, tmp), tmp)
    cli, admin = await connect(settings, "cli-bench"), await connect(settings, "admin")
    pub, js = cli.jetstream(timeout=30), admin.jetstream(timeout=30)
    subject = subjects.ingress(subjects.principal("cli", "bench"), "task_submitted")
    began, start_seq = time.monotonic(), (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq
    try:
        while (last := (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq) < target:
            count = min(WINDOW, max(1, (target - last) // 2))
            acks = []
            for _ in range(count):
                event = TaskSubmitted(id=new_id(), task_id=f"t{next_task}", skill="echo", input={"i": next_task})
                acks.append(await pub.publish_async(subject, codec.encode(event)))
                next_task += 1
            await asyncio.gather(*acks)
            while True:  # caught up: nothing waiting in INGRESS, little in WORK
                ingress = (await js.stream_info(subjects.INGRESS_STREAM)).state.messages
                work = (await js.stream_info(subjects.WORK_STREAM)).state.messages
                if ingress == 0 and work < WINDOW // 4:
                    break
                await asyncio.sleep(0.2)
            rate = (last - start_seq) / max(time.monotonic() - began, 1e-9)
            say(f"  AUDIT at {last:,} records ({rate:,.0f} records/s)")
        # Let the last records settle (claims with results) before stopping.
        while (await js.stream_info(subjects.WORK_STREAM)).state.messages:
            await asyncio.sleep(0.2)
    finally:
        await cli.close()
        await admin.close()
        await _stop(agent)
        await _stop(router)
    return next_task, [line for line in _lines(router_log) if line.get("event") in ("snapshot_started", "snapshot_saved")]


async def _cold_start(settings: Settings, tmp: Path, every: str) -> dict[str, Any]:
    spawned = time.monotonic()
    proc, log = await _spawn("cold", ["router"], _env(settings, tmp, LEDGERBUS_SNAPSHOT_EVERY=every), tmp)
    try:
        while True:
            lines = _lines(log)
            if any(line.get("event") == "router_started" for line in lines):
                elapsed = time.monotonic() - spawned
                break
            if proc.returncode is not None:
                raise RuntimeError(f"the router exited ({proc.returncode}): {log.read_text()[-2000:]}")
            await asyncio.sleep(0.005)
    finally:
        await _stop(proc)
    recovered = next(line for line in lines if line.get("event") == "audit_recovered")
    return {"cold_start_s": elapsed, "recover_s": recovered.get("seconds"), "tail": recovered.get("tail"),
            "from_snapshot": recovered.get("from_snapshot"), "head_seq": recovered.get("head_seq"),
            "tasks": recovered.get("tasks")}


async def _snapshot_bytes(settings: Settings) -> int:
    nc = await connect(settings, "admin")
    try:
        store = await nc.jetstream().object_store(subjects.SNAPSHOT_BUCKET)
        try:
            infos = [i for i in await store.list(ignore_deletes=True) if i.name.startswith("router-")]
        except nats.js.errors.NotFoundError:
            return 0  # none yet (fewer records than LEDGERBUS_SNAPSHOT_EVERY)
        return int(max(infos, key=lambda i: i.name).size or 0) if infos else 0
    finally:
        await nc.close()


async def run(sizes: list[int], rounds: int, principals: list[Identity], repo: Path,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Grow one log to each of ``sizes`` records and measure cold starts at each."""
    results: dict[str, Any] = {"sizes": {}, "rounds": rounds, "snapshot_every": Settings().snapshot_every}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "ws").mkdir()
        config = write_local_config(tmp / "conf", repo / "nats.conf", principals)
        async with NatsServer(tmp / "js", config=config) as server:
            settings = Settings(url=server.url, connect_timeout_s=10, auth_dir=config.parent / "var" / "auth",
                                policy_path=tmp / "policy.toml", router_key_path=tmp / "keys" / "router.key")
            admin = await connect(settings, "admin")
            await provision(admin.jetstream(), settings)
            await admin.close()
            next_task = 0
            for size in sorted(sizes):
                say(f"growing the log to {size:,} records")
                grown = time.monotonic()
                next_task, encoded = await _grow(settings, tmp, size, next_task, say)
                grow_s = time.monotonic() - grown
                starts: dict[str, list[dict[str, Any]]] = {"full": [], "snapshot": []}
                for r in range(rounds):
                    order = [("full", "0"), ("snapshot", str(Settings().snapshot_every))]
                    for name, every in order if r % 2 else reversed(order):
                        start = await _cold_start(settings, tmp, every)
                        starts[name].append(start)
                        say(f"  round {r + 1}/{rounds} {name:<8}: {start['cold_start_s']:.2f} s to router_started "
                            f"(recovery {start['recover_s']} s, tail {start['tail']:,} of {start['head_seq']:,})")
                full, snap = starts["full"], starts["snapshot"]
                started = [e for e in encoded if e["event"] == "snapshot_started"]
                saved = [e for e in encoded if e["event"] == "snapshot_saved"]
                results["sizes"][str(size)] = {
                    "records": full[0]["head_seq"],
                    "tasks": full[0]["tasks"],
                    "grow_s": round(grow_s, 1),
                    "cold_start_full_s": statistics.median(s["cold_start_s"] for s in full),
                    "cold_start_snapshot_s": statistics.median(s["cold_start_s"] for s in snap),
                    "recover_full_s": statistics.median(s["recover_s"] for s in full),
                    "recover_snapshot_s": statistics.median(s["recover_s"] for s in snap),
                    "tail": snap[0]["tail"],
                    "from_snapshot": snap[0]["from_snapshot"],
                    "snapshot_bytes": await _snapshot_bytes(settings),
                    "snapshot_pause_ms_median": statistics.median(e["pause_ms"] for e in started) if started else None,
                    "snapshot_pause_ms_last": started[-1]["pause_ms"] if started else None,
                    "snapshot_write_ms_last": saved[-1]["write_ms"] if saved else None,
                    "rounds_full_s": [round(s["cold_start_s"], 3) for s in full],
                    "rounds_snapshot_s": [round(s["cold_start_s"], 3) for s in snap],
                }
                say(json.dumps(results["sizes"][str(size)]))
    return results
