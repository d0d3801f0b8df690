"""A task's path in its tree, defined once for everyone who names one: the router (each work
item's ``path``, ``router/dispatch.py``), agents (what a skill submits, ``agents/memory.py``)
and the projections (a fork's tree, ``projections/queries.py`` and ``projections/fork.py``).

A root is its skill (``plan`` for a plan); below it, a plan's step is its step id and any
other task is ``<skill>.<n>``, the n-th task of that skill its parent submitted, from 1:
``reason/echo.2``, ``plan/plan.1/design``. A re-run or a fork of a tree gives its tasks the
same paths whatever their ids, which is what recorded LLM calls are matched on
(docs/replay.md).
"""

from __future__ import annotations


def below(parent: str, skill: str, n: int, step: str | None = None) -> str:
    """The path of a task under ``parent``'s path: by ``step`` for a plan's step, else the
    ``n``-th task of ``skill`` its parent submitted."""
    return f"{parent}/{step}" if step else f"{parent}/{skill}.{n}"
