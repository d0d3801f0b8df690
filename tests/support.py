"""Helpers shared by the tests: reading the log, waiting on it, running agentctl processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from ledgerbus.bus import codec, signing, subjects
from ledgerbus.bus.acks import LaterAcks
from ledgerbus.bus.events import TaskStarted, kind_of, new_id
from ledgerbus.bus.identity import Registry, identity, permissions, write_local_config
from ledgerbus.bus.records import AuditRecord
from ledgerbus.bus.settings import Settings
from ledgerbus.router.claims import ClaimTokens

REPO = Path(__file__).resolve().parent.parent

# The principals tests connect as, each a real NATS user with generated permissions.
TEST_PRINCIPALS = [
    identity("admin"), identity("router"), identity("projector"),
    identity("cli", "tester"), identity("cli", "ops"), identity("cli", "carol"),
    identity("agent", "echo-1", ["echo"]), identity("agent", "sleeper-1", ["sleep"]),
    identity("agent", "agent-a", ["sleep"]), identity("agent", "agent-b", ["sleep"]),
    identity("agent", "spender", ["spend"]), identity("agent", "a1", ["echo"]), identity("agent", "b1", ["sleep"]),
    identity("agent", "scribe-1", ["notes"]), identity("agent", "scribe-2", ["notes"]),
    identity("agent", "thinker-1", ["llm.chat", "plan", "reason"]), identity("agent", "runner-1", ["shell", "python"]),
    identity("agent", "counter-1", ["wordcount"]),
    identity("agent", "frontend", ["echo", "llm.chat"]), identity("agent", "backend", ["echo", "llm.chat"]),
    identity("agent", "devops", ["llm.chat"]), identity("agent", "testing", ["llm.chat"]),
    identity("agent", "product-manager", ["llm.chat"]), identity("agent", "architect", ["llm.chat"]),
    identity("agent", "developer", ["llm.chat"]), identity("agent", "qa", ["llm.chat"]),
    identity("agent", "delegator", ["delegate"]),
]


def _harness(kind: str) -> dict[str, Any]:
    """A test-harness user that may speak as any principal of ``kind``.

    Router tests send as many principals (alice, bob, worker-1, worker-2...) from one
    connection, which real identities forbid by design. These users exist only in test
    configurations; ``agentctl keys`` never makes one. The identity tests use real
    per-principal users only.
    """
    perms = permissions(identity(kind, "x", ["echo"] if kind == "agent" else []))
    user = f"harness-{kind}"
    swap = {f"in.{kind}.x.>": f"in.{kind}.*.>", "$KV.agents.x.>": "$KV.agents.>", "_INBOX_" + f"{kind}-x.>": f"_INBOX_{user}.>"}
    allow = [swap.get(s, s) for s in perms["publish"]["allow"] if ".WORK.skill-echo" not in s]
    if kind == "agent":
        allow += ["$JS.API.CONSUMER.CREATE.WORK.>", "$JS.API.CONSUMER.DURABLE.CREATE.WORK.>",
                  "$JS.API.CONSUMER.INFO.WORK.>", "$JS.API.CONSUMER.MSG.NEXT.WORK.>", "$JS.ACK.WORK.>"]
    return {"user": user, "password": f"{user}-pw",
            "permissions": {"publish": {"allow": allow},
                            "subscribe": {"allow": [f"_INBOX_{user}.>", *(["notify.agent.*.>"] if kind == "agent" else [])]}}}


HARNESS_USERS = [_harness("cli"), _harness("agent")]


def server_config(directory: Path) -> Path:
    """The repo's nats.conf with test identities, self-contained in ``directory``."""
    return write_local_config(directory, REPO / "nats.conf", TEST_PRINCIPALS, HARNESS_USERS)


def auth_dir(config: Path) -> Path:
    """Where :func:`server_config` put the credentials."""
    return config.parent / "var" / "auth"


async def stored_audit(js: JetStreamContext) -> list[tuple[int, bytes]]:
    """Every AUDIT message as ``(stream seq, stored bytes)``, in order (from the first the
    stream still holds: the retention rule may have archived those before)."""
    state = (await js.stream_info(subjects.AUDIT_STREAM)).state
    last = state.last_seq
    out: list[tuple[int, bytes]] = []
    if last == 0:
        return out
    sub = await js.subscribe(subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    try:
        while len(out) < last - state.first_seq + 1:
            msg = await sub.next_msg(timeout=10)
            out.append((msg.metadata.sequence.stream, msg.data))
    finally:
        await sub.unsubscribe()
    return out


async def audit_records(js: JetStreamContext) -> list[AuditRecord]:
    """Every audit record, decoded, in order."""
    return [codec.decode_record(data) for _, data in await stored_audit(js)]


async def send(nc: Client, role: str, name: str, event: Any, msg_id: str | None = None) -> None:
    """Publish ``event`` to INGRESS as principal ``<role>-<name>`` (a harness connection may)."""
    headers = {subjects.HDR_MSG_ID: msg_id} if msg_id else None
    await nc.jetstream().publish(subjects.ingress(subjects.principal(role, name), kind_of(type(event))),
                                 codec.encode(event), headers=headers)


def register_agent(settings: Settings, name: str, skills: list[str]) -> None:
    """Record in the identity registry that ``agent-<name>`` was given ``skills`` (added to
    any it has), as ``agentctl keys add`` does: the router refuses a claim for a skill its
    sender was not given."""
    registry = Registry.load(settings.auth_dir)
    held = registry.entries.get(f"agent-{name}")
    registry.add(identity("agent", name, {*skills, *(held[0].skills if held else ())}))
    registry.save()


def claim(settings: Settings, name: str, task_id: str, skill: str, attempt: int = 1, dispatch: int = 1,
          msg_id: str | None = None) -> TaskStarted:
    """A claim by ``agent-<name>`` of a task it received: the token is the one the router put
    in the dispatch's work item (made from the test router's key, as the router makes it),
    and the sender is registered with the skill."""
    register_agent(settings, name, [skill])
    tokens = ClaimTokens(signing.load_or_create(settings.router_key_path))
    return TaskStarted(id=msg_id or new_id(), task_id=task_id, attempt=attempt, dispatch=dispatch,
                       token=tokens.token(task_id, dispatch))


async def wait_for_record(
    js: JetStreamContext, predicate: Callable[[AuditRecord], bool], timeout: float = 30.0
) -> AuditRecord:
    """Follow AUDIT from the start until a record satisfies ``predicate``."""
    sub = await js.subscribe(subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except TimeoutError:
                    continue
                record = codec.decode_record(msg.data)
                if predicate(record):
                    return record
    finally:
        await sub.unsubscribe()


async def wait_for_records(
    js: JetStreamContext, count: int, timeout: float = 30.0
) -> list[AuditRecord]:
    """Wait until AUDIT holds at least ``count`` records; return them all."""
    async with asyncio.timeout(timeout):
        while (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq < count:
            await wait_for_record(js, lambda r: r.seq >= count, timeout)
    return await audit_records(js)


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``condition`` until it holds: for state with no event to wait on (stream counts).
    A :class:`TimeoutError` names ``what`` was waited for, and how long."""
    try:
        async with asyncio.timeout(timeout):
            delay = 0.02
            while not await condition():
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
    except TimeoutError as exc:
        raise TimeoutError(f"waited {timeout:g} s for {what or 'the condition'}") from exc


async def work_count(js: JetStreamContext) -> int:
    """How many messages WORK holds (not yet acked by an agent)."""
    return (await js.stream_info(subjects.WORK_STREAM)).state.messages


def suite_settings(url: str, tmp: Path, workspace_root: Path, auth: Path, **changes: Any) -> Settings:
    """The settings of a test's processes: its server, files in its temporary directory,
    and short timers so that redelivery tests run fast (``changes`` on top)."""
    return Settings(
        url=url,
        db_path=tmp / "live.db",
        policy_path=tmp / "policy.toml",
        llm_config_path=tmp / "llm.toml",
        workspace_root=workspace_root,
        policy_check_interval_s=0.0,
        auth_dir=auth,
        router_key_path=tmp / "keys" / "router.key",
        work_ack_wait_s=2.0,
        ingress_ack_wait_s=2.0,
        heartbeat_interval_s=0.5,
        agents_ttl_s=4.0,
        drain_timeout_s=5.0,
        connect_timeout_s=10.0,
    ).replace(**changes)


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment an agentctl subprocess runs with, pointing at the test's server."""
    env = dict(os.environ)
    env.update(
        LEDGERBUS_URL=settings.url,
        LEDGERBUS_DB_PATH=str(settings.db_path),
        LEDGERBUS_POLICY_PATH=str(settings.policy_path),
        LEDGERBUS_LLM_CONFIG_PATH=str(settings.llm_config_path),
        LEDGERBUS_WORKSPACE_ROOT=str(settings.workspace_root),
        LEDGERBUS_KEEP_WORKSPACES=settings.keep_workspaces,
        LEDGERBUS_AUTH_DIR=str(settings.auth_dir),
        LEDGERBUS_ROUTER_KEY_PATH=str(settings.router_key_path),
        LEDGERBUS_CHECKPOINT_EVERY=str(settings.checkpoint_every),
        LEDGERBUS_ROUTER_BATCH=str(settings.router_batch),
        LEDGERBUS_WORK_ACK_WAIT_S=str(settings.work_ack_wait_s),
        LEDGERBUS_INGRESS_ACK_WAIT_S=str(settings.ingress_ack_wait_s),
        LEDGERBUS_HEARTBEAT_INTERVAL_S=str(settings.heartbeat_interval_s),
        LEDGERBUS_AGENTS_TTL_S=str(settings.agents_ttl_s),
        LEDGERBUS_DRAIN_TIMEOUT_S=str(settings.drain_timeout_s),
        LEDGERBUS_MEMORY_LIST_CAP=str(settings.memory_list_cap),
        LEDGERBUS_PROJECTOR_BATCH=str(settings.projector_batch),
        LEDGERBUS_STREAM_REPLICAS=str(settings.stream_replicas),
        # A router restarted after kill -9 waits for the dead one's lease: keep that short.
        LEDGERBUS_ROUTER_LEASE_S="3",
        LEDGERBUS_CLI_NAME="tester",
        LEDGERBUS_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    # Telemetry goes where a test says, never where the machine running it is set up to send.
    for key in [k for k in env if k.startswith("OTEL_")] + ["LEDGERBUS_USER", "LEDGERBUS_PASSWORD"]:
        env.pop(key, None)
    env.update(extra)
    return env


@dataclass
class Proc:
    """One agentctl subprocess, its log in a file the test can show on failure."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path

    def kill9(self) -> None:
        """SIGKILL: no cleanup, no drain, exactly what a crash looks like."""
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait (SIGKILL if it will not stop); return the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def logged(self, event: str) -> bool:
        """Whether the process has logged ``event`` so far."""
        return any(line.get("event") == event for line in self.log_lines())

    async def wait_logged(self, event: str, timeout: float = 30.0) -> None:
        """Wait until the process logs ``event``."""

        async def seen() -> bool:
            return self.logged(event)

        await wait_until(seen, timeout, what=f"{self.name} logging {event}")

    def log_lines(self) -> list[dict[str, Any]]:
        """The structured log lines the process wrote so far."""
        lines = []
        for line in self.log.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"event": line})
        return lines


@dataclass
class Procs:
    """Starts agentctl subprocesses for a test and stops them all at teardown."""

    settings: Settings
    tmp: Path
    started: list[Proc] = field(default_factory=list)

    async def start(self, name: str, *args: str, **env: str) -> Proc:
        """``agentctl <args>`` as a subprocess."""
        log = self.tmp / f"{name}-{len(self.started)}.log"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ledgerbus.agentctl", *args,
            env=process_env(self.settings, **env), cwd=self.tmp,
            stdout=asyncio.subprocess.DEVNULL, stderr=log.open("wb"),
        )
        p = Proc(name, proc, log)
        self.started.append(p)
        return p

    async def stop_all(self) -> None:
        """Stop every process still running."""
        await asyncio.gather(*(p.stop() for p in self.started), return_exceptions=True)


async def agentctl(
    settings: Settings, *args: str, timeout: float = 60.0, as_user: str = "tester", env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> tuple[int, str, str]:
    """Run one agentctl command to completion as CLI user ``as_user`` (``env`` added to its
    environment, ``stdin`` its input): ``(exit code, stdout, stderr)``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerbus.agentctl", *args,
        env=process_env(settings, LEDGERBUS_CLI_NAME=as_user, **(env or {})),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate(None if stdin is None else stdin.encode())
    assert proc.returncode is not None
    # Whatever happened, a person sees a message from agentctl, never a Python traceback.
    assert b"Traceback" not in err and b"never retrieved" not in err, err.decode()
    return proc.returncode, out.decode(), err.decode()


class LoopTurns:
    """Counts the event loop's turns while running (a task that yields once a turn), so a
    test can say how many turns one event took to wake its waiter: each turn is an
    ``epoll_wait`` and the loop's Python, and a lone task pays it at every hop."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _spin(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.count += 1

    def __enter__(self) -> Self:
        self._task = asyncio.get_running_loop().create_task(self._spin())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def wrap(self, callback: Callable[..., Awaitable[None]], seen: list[int]) -> Callable[..., Awaitable[None]]:
        """``callback``, noting the turn it ran in into ``seen``."""
        async def noted(*args: Any) -> None:
            await callback(*args)
            seen.append(self.count)
        return noted


class LostAcks(LaterAcks):
    """Late acks (``bus/acks.py``) that never go out, as if the process died first."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Msg] = []

    def add(self, msg: Msg) -> None:
        self.held.append(msg)
