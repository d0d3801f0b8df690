"""The ``usage`` projection: one row per accepted ``task_usage`` report (an LLM call, say),
so spending is queryable by task, agent, provider and model without reading the log."""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus.events import AuditRecord, TaskUsage
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso
from ledgerbus.projections.tasks import agent_name


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Insert one row per accepted usage report (one over budget is accepted too: it was spent)."""
    rows = [
        (r.seq, iso(r.at), e.task_id, agent_name(r.principal), e.provider, e.model, e.tokens_in, e.tokens_out,
         e.cost_usd, e.latency_s, e.outcome)
        for r in records if type(e := r.event) is TaskUsage and r.verdict == "accepted"
    ]
    if rows:
        batch.plan.add_many(
            "INSERT INTO usage (seq, at, task_id, agent, provider, model, tokens_in, tokens_out, cost_usd, latency_s,"
            " outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
