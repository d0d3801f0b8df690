"""Replay: answer LLM calls from recorded ones instead of a model.

A :class:`Recording` is a set of recorded calls (:mod:`agents.llm.calls`), from a file
(``agentctl llm export``; the demo's ships with the package) or from the LLMCALLS stream
(a fork's, named by :attr:`bus.events.Replay.recording`: a :class:`Manifest` listing the
calls by hash). A call is answered by, in this order:

1. **strict**: a recorded call whose request hash is the call's (the same system prompt,
   messages, schema and parameters, as the skill made them); among several, the one at the
   same place (task path and call number), else the first;
2. **lenient** (when asked for): the recorded call with the same call number in the task
   at the same path of its tree, whatever its request (prompts that embed task ids or
   times differ from run to run);
3. else nothing: the caller either goes to the model (``live``) or fails with
   :class:`ReplayMiss`, which names the call, its task path and number, and what the
   recording holds for that path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import msgspec
from nats.js import JetStreamContext

from ledgerbus.agents.llm import calls
from ledgerbus.agents.llm.base import ChatRequest, ChatResult, ProviderError
from ledgerbus.agents.llm.calls import CallRecord
from ledgerbus.bus.events import Kept

Match = Literal["strict", "lenient"]

MANIFEST_FORMAT = 1


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """A recording stored in LLMCALLS: the calls it answers from, by hash (``agentctl fork``)."""

    v: int = MANIFEST_FORMAT
    kind: Literal["recording"] = "recording"
    source_task_id: str
    at_seq: int = 0
    """The log position the recording stops at (0: the whole run)."""
    calls: list[str]
    kept: dict[str, Kept] = msgspec.field(default_factory=dict)
    """Task path → a task of the source run that had completed by ``at_seq``: a forked
    skill that submits a subtask or plan step at that path gets it back instead of running
    it again (:class:`agents.memory.Tasks`)."""
    rebase: tuple[str, str] | None = None
    """(old, new): the source is a subtask, at path ``old`` of its tree; in the fork it is
    the root, at ``new``. Recorded paths under ``old`` are read as under ``new``."""


class ReplayMiss(ProviderError):
    """No recorded answer for a call (and the call may not go to a model)."""

    def __init__(self, message: str) -> None:
        super().__init__("refused", message, provider="replay")


class Recording:
    """Recorded calls, indexed by request hash and by (task path, call number)."""

    def __init__(self, records: Iterable[tuple[str, CallRecord]], *, source: str,
                 raw: dict[str, bytes] | None = None, kept: dict[str, Kept] | None = None,
                 rebase: tuple[str, str] | None = None) -> None:
        self.source = source
        self.kept = kept or {}
        """Task path → a source task kept by a fork (see :attr:`Manifest.kept`)."""
        self.raw = raw or {}
        """Call hash → the stored bytes, for calls read from a file (stored again in LLMCALLS
        when they answer, so ``agentctl llm show`` finds them)."""
        """What the recording is, for messages: a file's path, or ``recording <hash>``."""
        self.by_hash: dict[str, list[tuple[str, CallRecord]]] = {}
        self.by_place: dict[tuple[str, int], tuple[str, CallRecord]] = {}
        self.count = 0
        for name, record in sorted(records, key=lambda nr: (nr[1].at, nr[1].n)):
            self.count += 1
            if record.answer is None:
                continue  # too large to keep its answer: nothing to replay from it
            if rebase is not None and (record.path == rebase[0] or record.path.startswith(rebase[0] + "/")):
                record = msgspec.structs.replace(record, path=rebase[1] + record.path[len(rebase[0]):])
            self.by_hash.setdefault(record.request_hash, []).append((name, record))
            # A task retried: its last attempt's calls are the ones the run went on with.
            self.by_place[(record.path, record.n)] = (name, record)

    @classmethod
    def from_file(cls, path: Path) -> Recording:
        """A recording exported as JSON lines, each a recorded call's stored bytes."""
        records: list[tuple[str, CallRecord]] = []
        raw: dict[str, bytes] = {}
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise ProviderError("config", f"recording {path}: {exc.strerror or exc}", provider="replay") from exc
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                name = calls.call_hash(line)
                records.append((name, calls.decode(line)))
                raw[name] = line
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise ProviderError("config", f"recording {path}, line {i}: not a recorded call ({exc})",
                                    provider="replay") from exc
        return cls(records, source=str(path), raw=raw)

    @classmethod
    async def from_store(cls, js: JetStreamContext, recording: str) -> Recording:
        """The recording stored in LLMCALLS under ``recording`` (a :class:`Manifest`), with
        every call it lists; each is checked against its hash."""
        try:
            manifest = msgspec.json.decode(await calls.fetch_bytes(js, recording), type=Manifest)
            fetched = await asyncio.gather(*(calls.fetch(js, name) for name in manifest.calls))
            records = list(zip(manifest.calls, fetched, strict=True))
        except (calls.CallNotFound, calls.CallCorrupt, msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ProviderError("config", f"recording {recording}: {exc}", provider="replay") from exc
        return cls(records, source=f"recording {recording[:12]} of task {manifest.source_task_id}",
                   kept=manifest.kept, rebase=manifest.rebase)

    def find(self, request_hash: str, path: str, n: int, match: Match) -> tuple[str, CallRecord] | None:
        """The recorded call that answers call ``n`` of the task at ``path`` whose request
        hashes to ``request_hash`` (see the module docstring); ``None``: none does."""
        same = self.by_hash.get(request_hash)
        if same:
            return next(((name, r) for name, r in same if (r.path, r.n) == (path, n)), same[0])
        if match == "lenient":
            return self.by_place.get((path, n))
        return None

    def miss(self, request_hash: str, path: str, n: int, match: Match) -> ReplayMiss:
        """The error for a call the recording has no answer for, naming it and what there is."""
        here = sorted(k for (p, k) in self.by_place if p == path)
        holds = (f"it has calls {', '.join(map(str, here))} of that task" if here
                 else "it has no call of a task at that path")
        how = "with the same request hash" if match == "strict" else "with the same request hash or place"
        return ReplayMiss(f"no recorded answer for call {n} of task path {path or '(root)'} (request sha256 "
                          f"{request_hash[:12]}) in {self.source}: {holds}, none {how}"
                          + ("; lenient matching would use the call at the same place" if match == "strict"
                             and (path, n) in self.by_place else ""))


class ReplayProvider:
    """``type = "replay"`` in the routing file: answers from a recording file, never from a
    model (the demo's profile; docs/replay.md). It needs the call's place in its task tree,
    which only ``ctx.llm`` knows, so the router asks it through :meth:`Recording.find`
    rather than :meth:`chat`."""

    def __init__(self, name: str, recording: Recording, match: Match = "lenient") -> None:
        self.name = name
        self.recording = recording
        self.match = match

    async def chat(self, request: ChatRequest, *, model: str, max_tokens: int,
                   params: dict[str, Any]) -> ChatResult:
        """Not used: see the class docstring."""
        raise ProviderError.of("config", "a replay provider answers only through ctx.llm", provider=self.name,
                               model=model)

    async def aclose(self) -> None:
        """Nothing to close."""
