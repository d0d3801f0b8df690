"""The ``proposals`` projection: agent configurations the router proposed when no live agent
could serve a plan step, or a submission of a skill nobody serves under policy
``[tasks] unserved = "propose"`` (``skill_unmatched``), and which an operator approved."""

from __future__ import annotations

from collections.abc import Sequence

from ledgerbus.bus import codec
from ledgerbus.bus.events import ProposalApproved, SkillUnmatched
from ledgerbus.bus.records import AuditRecord
from ledgerbus.projections.batch import Batch
from ledgerbus.projections.db import iso

COLUMNS = ("proposal_id", "task_id", "capabilities", "name", "skills", "prompt", "status", "profile",
           "proposed_at", "proposed_seq", "approved_by", "approved_at", "updated_seq")


_KINDS = frozenset((SkillUnmatched, ProposalApproved))


async def apply(batch: Batch, records: Sequence[AuditRecord]) -> None:
    """Fold a batch: an unmatched step or submission opens a proposal, an approval closes it;
    an archive deletes the proposals made for the tasks it compacts out (as the router
    forgets them: approving one later is refused)."""
    mine = [r for r in records if r.seq in batch.archived or (r.verdict == "accepted" and type(r.event) in _KINDS)]
    if not mine:
        return
    rows = batch.rows("proposals", ("proposal_id",), COLUMNS)
    await rows.load(batch.fetch, ((r.event.proposal_id,) for r in mine if isinstance(r.event, ProposalApproved)))
    for record in mine:
        if record.seq in batch.archived:
            for key in sorted(await rows.where_in(batch.fetch, "task_id", batch.archived[record.seq], ())):
                rows.delete(key)
            continue
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
    rows.store(batch.plan)
