"""The ``usage`` projection: one row per accepted ``task_usage`` report (an LLM call, say),
so spending is queryable by task, agent, provider and model without reading the log.

An archive deletes the rows of the tasks it compacts out, but what they spent still
counts: it is added to ``usage_archived``, one row per agent, provider and model (calls,
failures, tokens, cost, total and longest latency), which ``q.usage.summary`` adds to the
live rows. Totals survive compaction; the calls one by one are in the archive.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ledgerbus.bus.events import TaskUsage
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso
from ledgerbus.projections.tasks import agent_name

_json = msgspec.json.Encoder().encode
SQL_INSERT = ("INSERT INTO usage (seq, at, task_id, agent, provider, model, tokens_in, tokens_out, cost_usd, latency_s,"
              " outcome, call) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
SQL_ARCHIVE = (
    "INSERT INTO usage_archived (agent, provider, model, calls, failed, tokens_in, tokens_out, cost_usd, latency_s,"
    " max_latency_s)"
    " SELECT agent, provider, model, count(*), sum(outcome NOT IN ('ok', 'replayed')), sum(tokens_in), sum(tokens_out), sum(cost_usd),"
    " sum(latency_s), max(latency_s) FROM usage WHERE task_id IN (SELECT value FROM json_each(?))"
    " GROUP BY agent, provider, model"
    " ON CONFLICT (agent, provider, model) DO UPDATE SET calls = calls + excluded.calls,"
    " failed = failed + excluded.failed, tokens_in = tokens_in + excluded.tokens_in,"
    " tokens_out = tokens_out + excluded.tokens_out, cost_usd = cost_usd + excluded.cost_usd,"
    " latency_s = latency_s + excluded.latency_s, max_latency_s = max(max_latency_s, excluded.max_latency_s)"
)
SQL_DELETE = "DELETE FROM usage WHERE task_id IN (SELECT value FROM json_each(?))"
"""Both take the compacted tasks' ids as one JSON array (one statement, however many)."""


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Insert one row per accepted usage report (one over budget is accepted too: it was
    spent); at an archive, fold the compacted tasks' rows into ``usage_archived``."""
    if not batch.archived:  # most batches
        batch.plan.add_many(SQL_INSERT, [_row(r, e) for r in records
                                         if type(e := r.event) is TaskUsage and r.verdict == "accepted"])
        return
    rows = []
    for r in records:
        if type(e := r.event) is TaskUsage and r.verdict == "accepted":
            rows.append(_row(r, e))
        elif r.seq in batch.archived:
            batch.plan.add_many(SQL_INSERT, rows)
            rows = []
            if gone := batch.archived[r.seq]:
                ids = (_json(gone).decode(),)
                batch.plan.add(SQL_ARCHIVE, ids)
                batch.plan.add(SQL_DELETE, ids)
    batch.plan.add_many(SQL_INSERT, rows)


def _row(r: AuditRecord, e: TaskUsage) -> tuple[object, ...]:
    return (r.seq, iso(r.at), e.task_id, agent_name(r.principal), e.provider, e.model, e.tokens_in, e.tokens_out,
            e.cost_usd, e.latency_s, e.outcome, e.call)
