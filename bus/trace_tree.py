"""One trace read from the TRACES stream and arranged as a tree, with its critical path:
what ``agentctl trace`` draws in the terminal and the control center in the browser."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from nats.js import JetStreamContext

from ledgerbus.bus import subjects
from ledgerbus.bus.follow import messages, records
from ledgerbus.bus.spans import SpanBatch, SpanRecord, decode_batch, unique


@dataclass
class Node:
    """A span in the tree, with its service and children in start order."""

    span: SpanRecord
    service: str
    children: list[Node] = field(default_factory=list)
    critical: bool = False
    orphan: bool = False
    """Its parent is not among the spans read (not published yet, or expired)."""


@dataclass
class TraceTree:
    """The spans of one trace arranged by parent links."""

    trace_id: str
    roots: list[Node]
    count: int
    services: list[str]

    @property
    def start_ns(self) -> int:
        return min(n.span.start_ns for n in self.walk()) if self.count else 0

    @property
    def end_ns(self) -> int:
        return max(n.span.end_ns for n in self.walk()) if self.count else 0

    def walk(self) -> list[Node]:
        """Every node, depth first, children in start order."""
        order: list[Node] = []
        stack = list(reversed(self.roots))
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(node.children))
        return order

    def critical_path(self) -> list[Node]:
        """From the root, each time the child whose subtree ends last: the chain of work
        that decided when the whole was done."""
        ends: dict[str, int] = {}
        for node in reversed(self.walk()):  # children before their parents
            ends[node.span.span_id] = max([node.span.end_ns, *(ends[c.span.span_id] for c in node.children)])
        path: list[Node] = []
        candidates = [n for n in self.roots if not n.orphan] or self.roots
        while candidates:
            node = max(candidates, key=lambda n: (ends[n.span.span_id], -n.span.start_ns))
            path.append(node)
            candidates = node.children
        return path


def build_tree(trace_id: str, batches: list[SpanBatch]) -> TraceTree:
    """Arrange the spans read from TRACES into a tree and mark its critical path."""
    pairs = unique(batches)
    nodes = {span.span_id: Node(span, service) for service, span in pairs}
    roots: list[Node] = []
    for node in nodes.values():
        parent = nodes.get(node.span.parent_span_id) if node.span.parent_span_id else None
        if parent is None:
            node.orphan = bool(node.span.parent_span_id)
            roots.append(node)
        else:
            parent.children.append(node)
    tree = TraceTree(trace_id, roots, len(nodes), sorted({service for service, _ in pairs}))
    for node in tree.critical_path():
        node.critical = True
    return tree


async def trace_id_of(js: JetStreamContext, task_id: str) -> str:
    """The trace a task belongs to: the one its first audit record names."""
    async for record, _ in records(js, subjects.audit_for_key(task_id)):
        if record.trace_id:
            return record.trace_id
    return ""


async def read_trace(js: JetStreamContext, trace_id: str) -> list[SpanBatch]:
    """Every span batch of one trace on TRACES (undecodable messages are skipped)."""
    batches = []
    async for msg in messages(js, subjects.TRACES_STREAM, subjects.traces_of(trace_id)):
        try:
            batches.append(decode_batch(msg.data))
        except msgspec.DecodeError:
            continue
    return batches
