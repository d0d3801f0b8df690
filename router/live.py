"""The live agents, as the router sees them: heartbeats from the ``agents`` bucket, taken
together per agent name (a pool of its replicas), and how well each fits what a task needs.

The scheduler assigns work with :func:`fits`; ``agentctl match`` shows the same list before
a step is submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec
import structlog
from nats.js import JetStreamContext

from ledgerbus.bus import subjects
from ledgerbus.bus.connection import cancel_requested
from ledgerbus.bus.messages import Heartbeat

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Pool:
    """One agent as the router sees it: every live instance of that name (its replicas),
    their slots together, and the skills they offer with the capabilities of each."""

    agent: str
    slots: int
    skills: dict[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class Fit:
    """One agent's skill that provides what a task needs, and how well (see :func:`fits`)."""

    agent: str
    skill: str
    score: float
    """``|needed| / |provided|``: 1 is an exact fit, lower a broader skill."""
    provided: frozenset[str]
    free: int
    """Slots of the agent not held by work assigned to it."""
    slots: int


class LiveAgents:
    """The agents whose heartbeats are in the ``agents`` bucket now (fed by a KV watch).

    The bucket's TTL removes a silent instance's key without telling watchers, so an
    instance whose last heartbeat is older than ``ttl_s`` is dropped here too, and noted
    in :attr:`lapsed` for the router to record (``agent_left``, ``heartbeat_expired``).
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self._beats: dict[str, Heartbeat] = {}
        self._ttl = timedelta(seconds=ttl_s)
        self.changed = False
        self.lapsed: list[tuple[Heartbeat, int]] = []
        """Instances whose heartbeat expired, with how many of their agent remain live."""
        self.ready = False
        """Whether the bucket's values at the start have all been read: until then an
        agent not seen may still be live, and its work is not handed on."""

    def expire(self, now: datetime) -> None:
        """Forget instances whose heartbeat is older than the TTL."""
        for key in [k for k, beat in self._beats.items() if beat.at < now - self._ttl]:
            self.delete(key, lapsed=True)

    def put(self, key: str, beat: Heartbeat) -> None:
        """An instance's heartbeat arrived."""
        old = self._beats.get(key)
        self._beats[key] = beat
        if (old is None or old.skills != beat.skills or old.capabilities != beat.capabilities
                or old.concurrency != beat.concurrency):
            self.changed = True

    def delete(self, key: str, lapsed: bool = False) -> None:
        """An instance left (its key was deleted: it stopped), or its heartbeat expired."""
        beat = self._beats.pop(key, None)
        if beat is not None:
            self.changed = True
            if lapsed:
                remaining = sum(1 for b in self._beats.values() if b.agent == beat.agent)
                self.lapsed.append((beat, remaining))

    def skills(self) -> set[str]:
        """Every skill some live instance runs (cheaper than :meth:`pools`)."""
        return {skill for beat in self._beats.values() for skill in beat.skills}

    def pools(self) -> dict[str, Pool]:
        """Every live agent, its instances taken together."""
        slots: dict[str, int] = {}
        skills: dict[str, dict[str, set[str]]] = {}
        for beat in self._beats.values():
            slots[beat.agent] = slots.get(beat.agent, 0) + max(beat.concurrency, 1)
            mine = skills.setdefault(beat.agent, {})
            for skill in beat.skills:
                mine.setdefault(skill, set()).update(beat.capabilities.get(skill, ()))
        return {agent: Pool(agent, slots[agent], {s: frozenset(c) for s, c in skills[agent].items()})
                for agent in slots}


def fits(required: Iterable[str], pools: dict[str, Pool], held: Callable[[str], int] = lambda agent: 0,
         skill: str | None = None, allowed: Callable[[str], bool] = lambda skill: True,
         prefer: str = "") -> list[Fit]:
    """Every live agent's skill that provides all of ``required``, best first.

    A skill provides its own name and the capabilities advertised with it. Each fit scores
    ``|required| / |provided|`` (1 is an exact fit; a broader skill scores lower, so a
    specialist wins over a generalist); ties go to the agent with the most free slots
    (``held(agent)``: its slots taken by work assigned to it), then to the name. ``skill``:
    only that skill (a step that names one). ``allowed``: the skills the submitter may run.
    ``prefer``: an agent that goes first whenever it fits (the agent of the role a step plays).
    """
    need = set(required)
    out: list[Fit] = []
    for agent, pool in pools.items():
        for name, caps in pool.skills.items():
            provided = caps | {name}
            if (skill is not None and name != skill) or not need <= provided or not allowed(name):
                continue
            out.append(Fit(agent, name, len(need) / len(provided), frozenset(provided),
                           pool.slots - held(agent), pool.slots))
    out.sort(key=lambda f: (f.agent != prefer, -f.score, -f.free / f.slots, f.agent, f.skill))
    return out


def match(required: Iterable[str], offers: dict[str, frozenset[str]]) -> tuple[str, float] | None:
    """The installed skill (name → capabilities) that best provides every ``required``
    capability, and its score (as :func:`fits` scores agents), for a proposal."""
    pools = {"": Pool("", 1, dict(offers))}
    found = fits(required, pools)
    return (found[0].skill, found[0].score) if found else None


async def watch_agents(js: JetStreamContext, live: LiveAgents, ready: asyncio.Event | None = None) -> None:
    """Keep ``live`` current from the ``agents`` bucket (heartbeats, with a TTL), for ever;
    a failed watch (reconnect, server restart) is started again, until cancelled.
    ``ready`` is set once the bucket's values at the start have all been read."""
    while not cancel_requested():
        try:
            kv = await js.key_value(subjects.AGENTS_BUCKET)
            watcher = await kv.watchall()
            try:
                async for entry in watcher:
                    if entry is None:
                        live.ready = live.changed = True
                        if ready is not None:
                            ready.set()
                        continue  # the marker after the initial values
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        live.delete(entry.key)
                        continue
                    try:
                        live.put(entry.key, msgspec.json.decode(entry.value, type=Heartbeat))
                    except Exception as exc:  # noqa: BLE001 - a bad heartbeat must not stop the watch
                        log.warning("heartbeat_undecodable", key=entry.key, error=str(exc))
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reconnects, server restarts: watch again
            log.warning("agents_watch_failed", error=str(exc))
            await asyncio.sleep(1.0)


async def start_watch(js: JetStreamContext, live: LiveAgents, timeout_s: float) -> asyncio.Task[None]:
    """Start following the agents' heartbeats, and read the ones there now first (for at
    most ``timeout_s``): a submission checked in the first moments must not be told that
    nobody serves a skill a live agent offers only because the watch had not caught up."""
    ready = asyncio.Event()
    task = asyncio.create_task(watch_agents(js, live, ready))
    try:
        async with asyncio.timeout(timeout_s):
            await ready.wait()
    except TimeoutError:
        # Serve anyway: a late watch makes at worst a needless warning, never a loss.
        log.warning("agents_watch_not_ready", waited_s=timeout_s)
    return task
