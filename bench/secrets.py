"""``python -m bench.secrets``: what the router's secret scan costs per message.

The scan (``router.checks.secrets.scan``) runs on every message the router decodes, so its
cost is paid on every hop. Two ordinary submissions are timed with :mod:`timeit`: a
typical one of about 300 bytes and a 20 KB one (prose, a code snippet, a JSON config,
digests and ids: what an LLM task's input looks like), neither holding a secret, which is
the common case. The best of several repeats is reported, in microseconds per message.
"""

from __future__ import annotations

import hashlib
import timeit

from bus import codec
from bus.events import TaskSubmitted
from router.checks import Inbound
from router.checks.secrets import scan
from router.state import RouterState

_PROSE = (
    "The quarterly report summarises revenue by region. Europe grew by 4.2 percent while "
    "the Americas were flat; the board asked for a breakdown by product line before Friday. "
)
_CODE = (
    "def fetch(session, url, retries=3):\n"
    "    for attempt in range(retries):\n"
    "        resp = session.get(url, timeout=10)\n"
    "        if resp.status_code == 200:\n"
    "            return resp.json()\n"
    "    raise RuntimeError(f'gave up on {url}')\n"
)


def small() -> TaskSubmitted:
    """A typical submission: about 300 bytes on the wire."""
    return TaskSubmitted(id="Yx3kQ9v2Lm8Rt5Wp1Zc7Ng", task_id="report-2024-q3-europe", skill="llm.chat",
                         input={"prompt": "Summarise the attached quarterly notes in three bullet points.",
                                "model": "fast", "max_tokens": 256, "temperature": 0.2})


def large(size: int = 20_000) -> TaskSubmitted:
    """A 20 KB submission: a document, code, a config and digests under ordinary keys."""
    parts: list[str] = []
    i = 0
    while sum(map(len, parts)) < size - 2_000:
        parts.append(_PROSE if i % 3 else _CODE)
        i += 1
    digests = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(8)]
    return TaskSubmitted(id="Hq7sV0b3Kd9Xe2Mf6Ra1Tu", task_id="review-big-doc", skill="llm.chat",
                         input={"document": "".join(parts), "files": digests,
                                "config": {"region": "eu-west-1", "replicas": 3, "image": "app:1.4.2",
                                           "env": {"LOG_LEVEL": "info", "WORKERS": "4"}}})


def cost_us(event: TaskSubmitted, number: int = 2_000, repeat: int = 7) -> float:
    """Best-of-``repeat`` microseconds of one scan of ``event``."""
    data = codec.encode(event)
    state = RouterState()

    def once() -> None:
        scan(Inbound(subject="in.cli.bench.task_submitted", data=data, headers={}, ingress_seq=1, delivery=1,
                     event=event), state)

    return min(timeit.repeat(once, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    """Print the scan's cost per message for both sizes."""
    for name, event, number in (("~300 B", small(), 5_000), ("20 KB", large(), 500)):
        size = len(codec.encode(event))
        print(f"{name:>7} ({size:,} bytes): {cost_us(event, number):7.1f} us per scan")  # noqa: T201 - a report


if __name__ == "__main__":
    main()
