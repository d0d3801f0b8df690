"""``python -m bench.llmcalls``: what recording an LLM call costs an agent.

Every answered ``ctx.llm.chat`` call is stored in LLMCALLS (``agents/llm/calls.py``) before
its usage is reported: the record is made (redacted, encoded, hashed) and published, and the
agent awaits the PubAck. This times both, for a small call (a 400-character prompt and
answer) and a large one (40 KB of prompt), on a nats-server from the wheel with the project's
nats.conf, as an agent. Medians of N calls, one at a time (as a skill makes them).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ledgerbus.agents.llm import calls
from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message
from ledgerbus.bus.connection import connect
from ledgerbus.bus.identity import identity, write_local_config
from ledgerbus.bus.provision import provision
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def _record(prompt_chars: int) -> tuple[ChatRequest, ChatResult]:
    request = ChatRequest(messages=[Message(role="user", content="Plan the work. " * (prompt_chars // 15))],
                          system="You are the architect.")
    return request, ChatResult(text="A design. " * 40, provider="claude", model="claude-sonnet-4-5",
                               tokens_in=prompt_chars // 4, tokens_out=100)


async def measure(calls_n: int = 500) -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-llmcalls-") as tmp:
        config = write_local_config(Path(tmp) / "conf", REPO / "nats.conf",
                                    [identity("router"), identity("agent", "bench", ["llm.chat"])])
        async with NatsServer(Path(tmp) / "js", config=config) as server:
            settings = Settings(url=server.url, auth_dir=config.parent / "var" / "auth", connect_timeout_s=10)
            router = await connect(settings, "router")
            await provision(router.jetstream(timeout=10), settings)
            agent = await connect(settings, "agent-bench")
            js = agent.jetstream(timeout=10)
            for label, chars in (("small", 400), ("large", 40_000)):
                request, result = _record(chars)
                made, stored = [], []
                for i in range(calls_n):
                    started = time.perf_counter()
                    _, body = calls.make(task_id=f"t{i}", attempt=1, path="plan/architect", n=i, skill="llm.chat",
                                         role="architect", agent="bench", request=request,
                                         request_sha256=calls.request_hash(request), result=result, max_tokens=1024,
                                         params={}, max_bytes=settings.llm_record_max_bytes)
                    middle = time.perf_counter()
                    await calls.store(js, body)
                    made.append(middle - started)
                    stored.append(time.perf_counter() - middle)
                out[f"{label}_bytes"] = len(body)
                out[f"{label}_make_ms"] = statistics.median(made) * 1000
                out[f"{label}_store_ms"] = statistics.median(stored) * 1000
            await agent.close()
            await router.close()
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    result = asyncio.run(measure(n))
    for label in ("small", "large"):
        print(f"{label}: {result[f'{label}_bytes'] / 1024:.1f} KiB record; make (redact, encode, hash) "
              f"{result[f'{label}_make_ms']:.3f} ms, store (publish, PubAck) {result[f'{label}_store_ms']:.3f} ms "
              f"(medians of {n})")


if __name__ == "__main__":
    main()
