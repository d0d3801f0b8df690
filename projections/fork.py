"""Forking a run: a new run of a task tree as it stood at a log position (``agentctl fork``).

:func:`plan` works out everything a fork sends, without sending anything:

1. the tree at ``at_seq``: the projections rebuilt to that position in a scratch file
   (:func:`projections.rebuild.rebuild_from_store`, from the newest projection snapshot
   before it), where the task must exist and not yet have completed;
2. what is kept: every task of the tree that had completed by then, by its path in the
   tree (``router/dispatch.py:path_of``), with its output; a plan's kept steps go in the new
   plan (``PlanSubmitted.kept``), the others are given back to the skills that submit them
   again (``agents/memory.py:Tasks``);
3. the recording: the tree's recorded LLM calls, from the live projection (all of them,
   or with ``live`` only those recorded by ``at_seq``: later calls go to the model), as a
   :class:`~agents.llm.replay.Manifest` stored in LLMCALLS;
4. the record of the fork: ``run_forked`` (source, position, recording, what is kept and
   restored), sent before anything it covers;
5. the memory of every agent that ran a task of the tree, as it was at ``at_seq``: a
   checkpoint holding it (``CheckpointSaved.memory``) and its restore, after a checkpoint
   of the memory as it is now (so the fork can be undone);
6. the new root: the source's own submission, read back from AUDIT, under a new id, with
   the recording to replay.

The original run is not touched: the fork's tasks are new ones (``<new root>-<step>`` for
a plan's steps).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from ledgerbus.agents.llm import calls
from ledgerbus.agents.llm.replay import Manifest
from ledgerbus.bus import codec, paths, subjects
from ledgerbus.bus.archive import configured
from ledgerbus.bus.errors import LedgerbusError
from ledgerbus.bus.events import (
    CheckpointRestored,
    CheckpointSaved,
    Kept,
    MemoryImage,
    PlanSubmitted,
    Replay,
    RunForked,
    TaskSubmitted,
    new_id,
)
from ledgerbus.bus.lifecycle import Status
from ledgerbus.bus.settings import Settings
from ledgerbus.projections import db as dbmod
from ledgerbus.projections import queries
from ledgerbus.projections.rebuild import rebuild_from_store


class ForkError(LedgerbusError):
    """A fork that cannot be made; the message says why and what would do."""


@dataclass
class Node:
    """One task of the source tree at the fork point."""

    task_id: str
    path: str
    skill: str
    status: str
    agent: str | None
    kept: bool


@dataclass
class ForkPlan:
    """What a fork sends, in order: the recording (:attr:`manifest_body`, stored first),
    :attr:`forked`, the checkpoints and restores of :attr:`memory`, then :attr:`root`."""

    source_task_id: str
    at_seq: int
    task_id: str
    nodes: list[Node]
    manifest: Manifest
    manifest_body: bytes
    recording: str
    root: TaskSubmitted | PlanSubmitted
    forked: RunForked
    memory: list[CheckpointSaved | CheckpointRestored] = field(default_factory=list)
    skipped_memory: dict[str, str] = field(default_factory=dict)
    """Agents whose memory is not restored, and why."""


Usage = list[dict[str, Any]]


async def plan(js: JetStreamContext, settings: Settings, task_id: str, at_seq: int, usage: Usage, *,
               live: bool = False, match: Literal["strict", "lenient"] = "lenient",
               new_task_id: str | None = None) -> ForkPlan:
    """The fork of ``task_id`` at ``at_seq`` (see the module docstring); ``usage`` is the
    source tree's usage rows now (``q.usage.list`` with ``tree``)."""
    with tempfile.TemporaryDirectory(prefix="ledgerbus-fork-") as scratch:
        path = Path(scratch) / "at.db"
        try:
            await rebuild_from_store(js, path, until_seq=at_seq, memory_list_cap=settings.memory_list_cap,
                                     archive=configured(settings)[0])
        except ValueError as exc:
            raise ForkError(str(exc)) from exc
        db = await dbmod.open_reader(path)
        try:
            root = await queries.get_task(db, task_id, tree=True)
            if root is None:
                raise ForkError(f"task {task_id} did not exist at seq {at_seq}: fork it at a later position "
                                "(`agentctl tasks show` lists its records)")
            if root["status"] == Status.COMPLETED:
                raise ForkError(f"task {task_id} had completed by seq {at_seq}: a fork from there would keep "
                                f"everything; fork it at a position before seq {root['updated_seq']}")
            prefix = await queries.task_path(db, task_id)
            nodes = list(_walk(root, prefix))
            images = {agent: await queries.get_memory(db, agent) for agent in sorted({n.agent for n in nodes if n.agent})}
        finally:
            await db.close()
    rebase = root["skill"]  # a fork's root is a root: its path is its skill (``plan`` for a plan)
    kept = {_rebased(n.path, prefix, rebase): Kept(source_task_id=n.task_id, output=_output(root, n.task_id))
            for n in nodes if n.kept}
    recorded = [row["call"] for row in usage if row.get("call") and row["outcome"] in ("ok", "replayed")
                and (not live or row["seq"] <= at_seq)]
    manifest = Manifest(source_task_id=task_id, at_seq=at_seq if live else 0, calls=list(dict.fromkeys(recorded)),
                        kept=kept, rebase=(prefix, rebase) if prefix != rebase else None)
    body = msgspec.json.encode(manifest, order="sorted")
    recording = calls.call_hash(body)
    new = new_task_id or new_id()
    replay = Replay(recording=recording, match=match, live=live)
    source = await _submission(js, root)
    submission: TaskSubmitted | PlanSubmitted
    if isinstance(source, PlanSubmitted):
        steps = {s.id for s in source.steps}
        submission = msgspec.structs.replace(source, id=new_id(), task_id=new, parent_task_id=None, replay=replay,
                                             kept={k.rsplit("/", 1)[-1]: v for k, v in kept.items()
                                                   if k.count("/") == 1 and k.rsplit("/", 1)[-1] in steps})
    else:
        submission = msgspec.structs.replace(source, id=new_id(), task_id=new, parent_task_id=None, replay=replay,
                                             handoff=False)
    memory: list[CheckpointSaved | CheckpointRestored] = []
    skipped: dict[str, str] = {}
    for agent, image in images.items():
        made = _image(image)
        if isinstance(made, str):
            skipped[agent] = made
            continue
        now_id, then_id = f"fork-{new}-before"[:64], f"fork-{new}-at-{at_seq}"[:64]
        memory += [CheckpointSaved(id=new_id(), agent=agent, checkpoint_id=now_id, label=f"before fork {new}"),
                   CheckpointSaved(id=new_id(), agent=agent, checkpoint_id=then_id,
                                   label=f"as at seq {at_seq} (fork {new} of {task_id})", memory=made),
                   CheckpointRestored(id=new_id(), agent=agent, checkpoint_id=then_id)]
    forked = RunForked(id=new_id(), task_id=new, source_task_id=task_id, at_seq=at_seq, recording=recording,
                       live=live, kept=[n.task_id for n in nodes if n.kept][:1000],
                       restored=sorted(a for a in images if a not in skipped)[:256])
    return ForkPlan(source_task_id=task_id, at_seq=at_seq, task_id=new, nodes=nodes, manifest=manifest,
                    manifest_body=body, recording=recording, root=submission, forked=forked, memory=memory,
                    skipped_memory=skipped)


def _walk(task: dict[str, Any], path: str) -> Iterator[Node]:
    """The tree's tasks with their paths, as the router names them (``path_of``)."""
    yield Node(task_id=task["task_id"], path=path, skill=task["skill"], status=task["status"], agent=task.get("agent"),
               kept=False)
    counts: dict[str, int] = {}
    for child in task.get("children") or []:
        if child.get("step") is not None and task["kind"] == "plan":
            here = paths.below(path, child["skill"], 0, child["step"])
        else:
            counts[child["skill"]] = counts.get(child["skill"], 0) + 1
            here = paths.below(path, child["skill"], counts[child["skill"]])
        if child["status"] == Status.COMPLETED:
            yield Node(task_id=child["task_id"], path=here, skill=child["skill"], status=child["status"],
                       agent=child.get("agent"), kept=True)
        else:
            yield from _walk(child, here)


def _output(root: dict[str, Any], task_id: str) -> Any:
    stack = [root]
    while stack:
        node = stack.pop()
        if node["task_id"] == task_id:
            return node.get("output")
        stack.extend(node.get("children") or [])
    return None


def _rebased(path: str, prefix: str, rebase: str) -> str:
    return rebase + path[len(prefix):] if path.startswith(prefix) else path


async def _submission(js: JetStreamContext, root: dict[str, Any]) -> TaskSubmitted | PlanSubmitted:
    """The source's submission, as the log holds it."""
    seq = root["submitted_seq"]
    try:
        msg = await js.get_msg(subjects.AUDIT_STREAM, seq)
    except (nats.js.errors.NotFoundError, nats.errors.Error) as exc:
        raise ForkError(f"the submission of task {root['task_id']} (audit seq {seq}) is no longer in AUDIT "
                        "(archived): `agentctl archive restore` it to read it") from exc
    record = codec.read_record(seq, msg.data or b"")
    if not isinstance(record.event, TaskSubmitted | PlanSubmitted) or record.event.task_id != root["task_id"]:
        raise ForkError(f"audit seq {seq} is not the submission of task {root['task_id']}")
    return record.event


def _image(memory: dict[str, Any]) -> MemoryImage | str:
    """An agent's memory (``q.memory.get``) as a checkpoint can hold it; why not, if not."""
    try:
        image = MemoryImage(
            role=memory["role"],
            knowledge={k: {"value": v["value"], "core": v["core"]} for k, v in memory["knowledge"].items()},
            # A summary of rolled-up entries holds no value: the entries it stands for are gone.
            observation=[e["value"] for e in memory["observations"] if not e.get("summary")],
            reasoning=[e["value"] for e in memory["reasoning"] if not e.get("summary")],
        )
    except (TypeError, KeyError) as exc:
        return f"its memory could not be read ({exc})"
    if len(codec.encode(image)) > MAX_IMAGE_BYTES:
        return (f"its memory at that point is over {MAX_IMAGE_BYTES // 1024} KiB, more than one checkpoint record "
                "holds: restore one of its own checkpoints (`agentctl checkpoint list`)")
    return image


MAX_IMAGE_BYTES = 192 * 1024
"""The largest memory a fork restores through one checkpoint record (under the ingress cap)."""
