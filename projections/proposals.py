"""The ``proposals`` projection: agent configurations the router proposed when no live agent
could serve a plan step (``skill_unmatched``), and which an operator approved."""

from __future__ import annotations

from collections.abc import Sequence

import aiosqlite

from bus import codec
from bus.events import AuditRecord, ProposalApproved, SkillUnmatched
from projections.db import iso
from projections.rows import Rows

COLUMNS = ("proposal_id", "task_id", "capabilities", "name", "skills", "prompt", "status", "profile",
           "proposed_at", "proposed_seq", "approved_by", "approved_at", "updated_seq")


async def apply(db: aiosqlite.Connection, records: Sequence[AuditRecord]) -> None:
    """Fold a batch: an unmatched step opens a proposal, an approval closes it."""
    mine = [r for r in records if r.accepted and isinstance(r.event, SkillUnmatched | ProposalApproved)]
    if not mine:
        return
    rows = Rows("proposals", ("proposal_id",), COLUMNS)
    await rows.load(db, ((r.event.proposal_id,) for r in mine if isinstance(r.event, ProposalApproved)))
    for record in mine:
        match record.event:
            case SkillUnmatched() as e:
                rows.put({
                    "proposal_id": e.id, "task_id": e.task_id, "capabilities": codec.encode(e.capabilities).decode(),
                    "name": e.proposal.name, "skills": codec.encode(e.proposal.skills).decode(),
                    "prompt": e.proposal.prompt, "status": "proposed", "profile": None,
                    "proposed_at": iso(record.at), "proposed_seq": record.seq, "approved_by": None,
                    "approved_at": None, "updated_seq": record.seq,
                })
            case ProposalApproved() as e:
                rows.update((e.proposal_id,), status="approved", profile=e.profile, approved_by=record.principal,
                            approved_at=iso(record.at), updated_seq=record.seq)
            case _:
                pass
    await rows.store(db)
