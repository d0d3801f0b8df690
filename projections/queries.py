"""Reads over the projection database, shared by the query service and ``agentctl --db``.

Times passed in (``now``) come from the caller, so the same query over the same file
always answers the same way; only shared-context expiry depends on the clock.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import aiosqlite

from ledgerbus.bus import paths
from ledgerbus.bus.compaction import no_such
from ledgerbus.projections.db import iso

_JSON_COLUMNS = {"input", "output", "skills", "value", "role", "state", "deps", "needs", "capabilities"}
MAX_TREE = 5000
"""Most descendants ``get_task(tree=True)`` returns."""


def _row(row: aiosqlite.Row) -> dict[str, Any]:
    return {k: (json.loads(row[k]) if k in _JSON_COLUMNS and row[k] is not None else row[k]) for k in row.keys()}  # noqa: SIM118 - Row iterates values


async def _all(db: aiosqlite.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    async with db.execute(sql, args) as cur:
        return [_row(r) for r in await cur.fetchall()]


async def _one(db: aiosqlite.Connection, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
    async with db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return _row(row) if row is not None else None


def _limit(limit: int) -> int:
    return max(1, min(limit, 10_000))


async def _newest(
    db: aiosqlite.Connection, table: str, order: str, limit: int, before: int | None = None,
    absent: tuple[str, ...] = (), **equal: str | None
) -> list[dict[str, Any]]:
    """Rows of ``table`` whose columns equal the given (non-empty) values and whose
    ``absent`` columns are NULL, newest first (only those whose ``order`` column is below
    ``before``, when given: the next page)."""
    where: list[tuple[str, str | int | None]] = [(f"{column} = ?", value) for column, value in equal.items() if value]
    where += [(f"{column} IS ?", None) for column in absent]
    if before is not None:
        where.append((f"{order} < ?", before))
    sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(c for c, _ in where) if where else "")
    return await _all(db, f"{sql} ORDER BY {order} DESC LIMIT ?", (*(v for _, v in where), _limit(limit)))


async def list_tasks(
    db: aiosqlite.Connection, status: str | None = None, limit: int = 100, parent_task_id: str | None = None, *,
    skill: str | None = None, agent: str | None = None, submitted_by: str | None = None, before_seq: int | None = None,
    top_level: bool = False,
) -> list[dict[str, Any]]:
    """The most recent tasks first, optionally only those in ``status``, under a parent (or
    with ``top_level`` under none), of a skill, run by an agent or submitted by a
    principal; ``before_seq`` pages on."""
    return await _newest(db, "tasks", "submitted_seq", limit, before_seq, ("parent_task_id",) if top_level else (),
                         status=status, parent_task_id=parent_task_id, skill=skill, agent=agent,
                         submitted_by=submitted_by)


async def resolve_task(db: aiosqlite.Connection, prefix: str, limit: int = 10) -> list[str]:
    """The ids of the tasks whose id starts with ``prefix`` (a range on the primary key,
    case-sensitive as ids are), in id order."""
    rows = await _all(db, "SELECT task_id FROM tasks WHERE task_id >= ? AND task_id < ? ORDER BY task_id LIMIT ?",
                      (prefix, prefix + "\U0010ffff", limit))
    return [r["task_id"] for r in rows]


_UNDER = """
    WITH RECURSIVE under(task_id) AS (
        SELECT task_id FROM tasks WHERE parent_task_id = ?
        UNION SELECT t.task_id FROM tasks t JOIN under u ON t.parent_task_id = u.task_id
    )"""
"""The ids of every task under the task bound to ``?``, as the table ``under``."""


async def get_task(db: aiosqlite.Connection, task_id: str, tree: bool = False) -> dict[str, Any] | None:
    """One task with the ids of its subtasks, its forks (``forks``) and the fork it is the
    root of (``forked_from``), or ``None``; with ``tree``, also every
    descendant (``children``, nested, in submission order; at most :data:`MAX_TREE`)."""
    task = await _one(db, "SELECT * FROM tasks WHERE task_id = ?", (task_id,))
    if task is None:
        return None
    children = await _all(db, "SELECT task_id FROM tasks WHERE parent_task_id = ? ORDER BY submitted_seq, task_id",
                          (task_id,))
    task["subtasks"] = [c["task_id"] for c in children]
    task["forks"] = await forks_of(db, task_id)
    task["forked_from"] = await fork_of(db, task_id)
    if tree:
        rows = await _all(db, f"""{_UNDER}
            SELECT * FROM tasks WHERE task_id IN (SELECT task_id FROM under LIMIT ?)
            ORDER BY submitted_seq, task_id""", (task_id, MAX_TREE))
        by_parent: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_parent.setdefault(row["parent_task_id"], []).append(row)
        for row in [task, *rows]:
            row["children"] = by_parent.get(row["task_id"], [])
            if row["kind"] == "plan":  # a plan's steps in the plan's order
                order = {step["id"]: i for i, step in enumerate(row["input"]["steps"])}
                row["children"].sort(key=lambda c: order.get(c["step"], len(order)))
    return task


async def missing_task(db: aiosqlite.Connection, task_id: str) -> str:
    """Why there is no row for ``task_id``: none was submitted, or (once records are
    archived) it may have settled and been compacted out."""
    async with db.execute("SELECT through_seq FROM archives WHERE name = 'audit'") as cur:
        row = await cur.fetchone()
    return no_such("task", task_id, int(row[0]) if row else 0)


async def list_agents(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    """Every agent that ever joined, by name, with its role and how many tasks it runs now."""
    return await _all(
        db,
        "SELECT agents.*, memory.role AS role,"
        " (SELECT count(*) FROM tasks WHERE tasks.agent = agents.name AND tasks.status = 'running') AS running"
        " FROM agents LEFT JOIN memory ON memory.agent = agents.name ORDER BY name",
    )


def _entry(e: dict[str, Any]) -> dict[str, Any]:
    if e["rolled"]:
        return {"n": e["n"], "summary": True, "rolled": e["rolled"], "first_seq": e["first_seq"],
                "first_at": e["first_at"], "seq": e["seq"], "at": e["at"]}
    return {"n": e["n"], "seq": e["seq"], "at": e["at"], "value": e["value"]}


async def get_memory(db: aiosqlite.Connection, agent: str) -> dict[str, Any]:
    """An agent's whole memory (empty if nothing was ever written about it)."""
    row = await _one(db, "SELECT * FROM memory WHERE agent = ?", (agent,)) or {}
    knowledge = await _all(db, "SELECT key, value, core, updated_seq FROM knowledge WHERE agent = ? ORDER BY key",
                           (agent,))
    entries = await _all(db, "SELECT * FROM memory_entries WHERE agent = ? ORDER BY section, n", (agent,))
    return {
        "agent": agent,
        "role": row.get("role"),
        "current_task": row.get("current_task"),
        "knowledge": {k["key"]: {"value": k["value"], "core": bool(k["core"]), "seq": k["updated_seq"]}
                      for k in knowledge},
        "observations": [_entry(e) for e in entries if e["section"] == "observation"],
        "reasoning": [_entry(e) for e in entries if e["section"] == "reasoning"],
        "wiped_seq": row.get("wiped_seq"),
        "restored_from": row.get("restored_from"),
        "updated_seq": row.get("updated_seq"),
    }


async def list_checkpoints(db: aiosqlite.Connection, agent: str) -> list[dict[str, Any]]:
    """An agent's checkpoints, oldest first, with the size of the memory each holds."""
    return await _all(
        db,
        "SELECT c.*,"
        " (SELECT count(*) FROM snap_knowledge k WHERE k.agent = c.agent AND k.checkpoint_id = c.checkpoint_id)"
        " AS knowledge,"
        " (SELECT count(*) FROM snap_entries e WHERE e.agent = c.agent AND e.checkpoint_id = c.checkpoint_id)"
        " AS entries"
        " FROM checkpoints c WHERE c.agent = ? ORDER BY c.seq",
        (agent,),
    )


async def get_shared(db: aiosqlite.Connection, namespace: str, key: str, now: datetime) -> dict[str, Any] | None:
    """One shared key, unless it is absent or expired at ``now``."""
    return await _one(
        db,
        "SELECT * FROM shared WHERE namespace = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
        (namespace, key, iso(now)),
    )


async def list_shared(db: aiosqlite.Connection, namespace: str, now: datetime) -> list[dict[str, Any]]:
    """A namespace's live keys, by key."""
    return await _all(
        db,
        "SELECT * FROM shared WHERE namespace = ? AND (expires_at IS NULL OR expires_at > ?) ORDER BY key",
        (namespace, iso(now)),
    )


async def list_approvals(db: aiosqlite.Connection, status: str | None = "pending") -> list[dict[str, Any]]:
    """Held submissions, oldest first (only those in ``status``, unless it is ``None``)."""
    if status:
        return await _all(db, "SELECT * FROM approvals WHERE status = ? ORDER BY requested_seq", (status,))
    return await _all(db, "SELECT * FROM approvals ORDER BY requested_seq")


async def list_proposals(
    db: aiosqlite.Connection, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Agent proposals for unmatched plan steps, newest first (only those in ``status``, if given)."""
    return await _newest(db, "proposals", "proposed_seq", limit, status=status)


async def get_proposal(db: aiosqlite.Connection, proposal_id: str) -> dict[str, Any] | None:
    """One proposal (``proposal_id`` is the id of its ``skill_unmatched`` event), or ``None``."""
    return await _one(db, "SELECT * FROM proposals WHERE proposal_id = ?", (proposal_id,))


async def list_audit(
    db: aiosqlite.Connection, key: str | None = None, principal: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Audit index rows, newest first, for a key and/or a principal."""
    return await _newest(db, "audit_index", "seq", limit, key=key, principal=principal)


async def list_usage(
    db: aiosqlite.Connection, task_id: str | None = None, agent: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Usage reports, newest first, for a task and/or an agent."""
    return await _newest(db, "usage", "seq", limit, task_id=task_id, agent=agent)


async def run_usage(db: aiosqlite.Connection, task_id: str, limit: int = 10_000) -> list[dict[str, Any]]:
    """The usage reports of a task and everything under it, in log order: a run's LLM calls."""
    return await _all(db, f"""{_UNDER}
        SELECT * FROM usage WHERE task_id = ? OR task_id IN (SELECT task_id FROM under LIMIT ?)
        ORDER BY seq LIMIT ?""", (task_id, task_id, MAX_TREE, _limit(limit)))


async def usage_by_call(db: aiosqlite.Connection, call: str, limit: int = 10) -> list[dict[str, Any]]:
    """The usage reports naming the recorded call ``call`` (or a call whose hash starts so)."""
    return await _all(db, "SELECT * FROM usage WHERE call >= ? AND call < ? ORDER BY seq LIMIT ?",
                      (call, call + "g", _limit(limit)))


async def task_path(db: aiosqlite.Connection, task_id: str) -> str:
    """A task's path in its tree (:mod:`bus.paths`), as the router names it, from the rows."""
    chain: list[dict[str, Any]] = []
    current: str | None = task_id
    while current is not None and len(chain) < 32:
        row = await _one(db, "SELECT task_id, kind, skill, step, parent_task_id FROM tasks WHERE task_id = ?",
                         (current,))
        if row is None:
            break
        chain.append(row)
        current = row["parent_task_id"]
    if not chain:
        return ""
    above = chain[-1]
    path: str = above["skill"]
    for row in reversed(chain[:-1]):
        if row["step"] is not None and above["kind"] == "plan":
            path = paths.below(path, row["skill"], 0, row["step"])
        else:
            siblings = await _all(db, "SELECT task_id FROM tasks WHERE parent_task_id = ? AND skill = ?"
                                  " ORDER BY submitted_seq, task_id", (above["task_id"], row["skill"]))
            path = paths.below(path, row["skill"], [s["task_id"] for s in siblings].index(row["task_id"]) + 1)
        above = row
    return path


async def forks_of(db: aiosqlite.Connection, task_id: str) -> list[dict[str, Any]]:
    """The forks of ``task_id`` (``run_forked`` records naming it as the source), oldest first."""
    return await _all(db, "SELECT * FROM forks WHERE source_task_id = ? ORDER BY seq", (task_id,))


async def fork_of(db: aiosqlite.Connection, task_id: str) -> dict[str, Any] | None:
    """The fork whose new root is ``task_id``, if it is one."""
    return await _one(db, "SELECT * FROM forks WHERE task_id = ?", (task_id,))


async def usage_summary(db: aiosqlite.Connection, task_id: str | None = None) -> list[dict[str, Any]]:
    """Per provider and model: calls, failed calls, tokens, cost and latency; for one task
    and everything under it (plan steps, subtasks), or for all tasks, those compacted out
    by archives included (``usage_archived``)."""
    head, where, archived = "", "", ""
    args: tuple[Any, ...] = ()
    if task_id is not None:
        head, where = _UNDER, "WHERE task_id = ? OR task_id IN (SELECT task_id FROM under LIMIT ?)"
        args = (task_id, task_id, MAX_TREE)
    else:
        archived = """UNION ALL SELECT provider, model, calls, failed, tokens_in, tokens_out, cost_usd, latency_s,
               max_latency_s FROM usage_archived"""
    return await _all(db, f"""{head}
        SELECT provider, model, SUM(calls) AS calls, SUM(failed) AS failed, SUM(tokens_in) AS tokens_in,
               SUM(tokens_out) AS tokens_out, ROUND(SUM(cost_usd), 6) AS cost_usd,
               ROUND(SUM(latency_s) / SUM(calls), 3) AS mean_latency_s, ROUND(MAX(max_latency_s), 3) AS max_latency_s
        FROM (SELECT provider, model, COUNT(*) AS calls, SUM(outcome NOT IN ('ok', 'replayed')) AS failed, SUM(tokens_in) AS tokens_in,
                     SUM(tokens_out) AS tokens_out, SUM(cost_usd) AS cost_usd, SUM(latency_s) AS latency_s,
                     MAX(latency_s) AS max_latency_s
              FROM usage {where} GROUP BY provider, model {archived})
        GROUP BY provider, model ORDER BY cost_usd DESC, calls DESC""", args)


async def verdict(db: aiosqlite.Connection, msg_id: str) -> dict[str, Any] | None:
    """The audit row of the accepted-or-rejected message ``msg_id``, once it is applied."""
    return await _one(
        db,
        "SELECT a.seq, a.verdict, a.code, a.reason, a.kind, a.key, a.at FROM audit_index a WHERE a.msg_id = ?"
        " ORDER BY a.seq LIMIT 1",
        (msg_id,),
    )
