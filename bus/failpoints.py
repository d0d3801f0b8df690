"""Fail points: named places where the chaos suite may crash a process on purpose.

A crash at a random moment rarely lands between two particular steps (the router's
append and its ack, say), and those are the moments where a lost or doubled message
would come from. So the processes name those moments, and a test arms them::

    LEDGERBUS_FAILPOINTS="router.appended=kill@3,agent.keepalive=off"

- ``NAME=kill@N``: the Nth time the process reaches ``NAME`` it sends itself SIGKILL,
  with no cleanup, no flush and no drain: what a power cut or the OOM killer does.
  ``kill`` alone is ``kill@1``.
- ``NAME=off``: the behaviour ``NAME`` guards is switched off (:func:`disabled`).

Each long-running process arms them from its environment once, as it starts
(:func:`arm`); a malformed spec stops it there with an error naming the item. Unarmed, a
fail point costs one truth test of an empty dict. The points (each documented in docs/reliability.md) are:

``router.fetched``
    a batch taken from INGRESS, nothing appended to AUDIT yet;
``router.appended``
    the batch's records stored in AUDIT, no task dispatched, nothing acked;
``router.dispatched``
    work published to WORK, INGRESS not acked;
``router.snapshot_writing``
    a snapshot's first chunk stored in the ``snapshots`` object store, its entry not yet;
``router.archive_written``
    archive segments written and sealed in the manifest, their ``audit_archived`` record not
    yet appended;
``router.archive_recorded``
    the ``audit_archived`` (or ``archive_expired``) record acknowledged, AUDIT not yet purged
    (the files not yet deleted);
``projector.applied``
    a batch's rows written inside the projector's transaction, not committed;
``projector.snapshot_writing``
    a projection snapshot's first chunk stored in the ``projections`` object store, its
    entry not yet;
``agent.skill_done``
    a skill returned, its result not reported;
``agent.keepalive``
    ``off``: agents stop sending in-progress acks while a skill runs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from ledgerbus.bus.errors import ConfigError

ENV = "LEDGERBUS_FAILPOINTS"
POINTS = ("router.fetched", "router.appended", "router.dispatched", "router.snapshot_writing", "router.archive_written",
          "router.archive_recorded", "projector.applied", "projector.snapshot_writing", "agent.skill_done",
          "agent.keepalive")


def parse(spec: str) -> tuple[dict[str, int], frozenset[str]]:
    """``(kill points -> the hit that kills, switched-off points)`` from a spec string."""
    kills: dict[str, int] = {}
    off: set[str] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep or name not in POINTS:
            raise ConfigError(f"{ENV}: {item!r} is not NAME=ACTION with NAME one of {', '.join(POINTS)}")
        if action == "off":
            off.add(name)
            continue
        verb, _, count = action.partition("@")
        if verb != "kill" or not (count or "1").isdigit() or int(count or "1") < 1:
            raise ConfigError(f"{ENV}: {item!r}: the action is kill, kill@N (N >= 1) or off")
        kills[name] = int(count or "1")
    return kills, frozenset(off)


_kills: dict[str, int] = {}
_off: frozenset[str] = frozenset()


def arm(env: Mapping[str, str]) -> None:
    """Arm the fail points ``env`` names (``LEDGERBUS_FAILPOINTS``); none if it names none."""
    global _kills, _off
    _kills, _off = parse(env.get(ENV, ""))


def reached(name: str, also: int | None = None) -> None:
    """The process is at fail point ``name``: die here if a test armed it for this hit
    (and first kill process ``also``, when two processes make up one: the projector and
    its writer)."""
    if _kills and name in _kills:
        _kills[name] -= 1
        if _kills[name] == 0:
            if also is not None:
                os.kill(also, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def disabled(name: str) -> bool:
    """Whether a test switched off the behaviour at ``name``."""
    return name in _off
