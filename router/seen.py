"""What the router remembers of the messages it audited, folded (by :class:`RouterState`)
from the same records as everything else:

- the record written for each INGRESS message, so that one redelivered after a crash
  between "audit appended" and "ingress acked" is acted on again but never audited twice
  (invariant 2). The newest ``capacity`` are kept, and those of messages gone from INGRESS
  (acked) are let go;
- the AUDIT seq of each accepted record's message id within the de-duplication horizon
  (at most ``max_ids`` of them), for the duplicate check.

A snapshot saves both as they are (``router/snapshots.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timedelta

from ledgerbus.bus.records import AuditRecord


class Seen:
    """Audited INGRESS messages and accepted message ids, oldest first."""

    def __init__(self, capacity: int, horizon_s: float, max_ids: int) -> None:
        self.audited: OrderedDict[int, AuditRecord] = OrderedDict()
        """INGRESS seq → the record written for that message."""
        self.messages: OrderedDict[str, tuple[int, datetime]] = OrderedDict()
        """message id → (seq, at) of its accepted record."""
        self._capacity = capacity
        self._horizon = timedelta(seconds=horizon_s)
        self._max_ids = max(1, max_ids)

    def ingress(self, record: AuditRecord) -> None:
        """The record written for its INGRESS message (whatever the verdict)."""
        self.audited[record.ingress_seq] = record
        self.audited.move_to_end(record.ingress_seq)
        while len(self.audited) > self._capacity:
            self.audited.popitem(last=False)

    def accepted(self, record: AuditRecord) -> None:
        """An accepted record's message id; the ids past the horizon are let go."""
        self.messages[record.msg_id] = (record.seq, record.at)
        while self.messages and (len(self.messages) > self._max_ids
                                 or next(iter(self.messages.values()))[1] < record.at - self._horizon):
            self.messages.popitem(last=False)

    def message(self, msg_id: str) -> int | None:
        """The seq of the accepted record with this message id, within the horizon."""
        seen = self.messages.get(msg_id)
        return seen[0] if seen is not None else None

    def record(self, ingress_seq: int) -> AuditRecord | None:
        """The audit record already written for an INGRESS message, if any."""
        return self.audited.get(ingress_seq)

    def forget_acked_before(self, ingress_first_seq: int) -> None:
        """Let go of the records of INGRESS messages gone (acked) from the stream."""
        for seq in [s for s in self.audited if s < ingress_first_seq]:
            del self.audited[seq]
