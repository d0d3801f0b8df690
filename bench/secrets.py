"""``python -m bench.secrets``: what the router's secret scan costs per message.

The scan (``router.checks.secrets.scan``) runs on every message the router decodes, so its
cost is paid on every hop. Two ordinary submissions are timed with :mod:`timeit`: a
typical one of about 300 bytes and a 20 KB one (prose, a code snippet, a JSON config,
digests and ids: what an LLM task's input looks like), neither holding a secret, which is
the common case. The best of several repeats of this process's CPU time is reported, in
microseconds per message (CPU time, so other work on a shared machine counts less).

``python -m bench.secrets --real-text`` measures false positives on text nobody wrote for
this test: the source and documentation of every installed library, the standard library
and this repository (test suites left out: they hold deliberate fake keys), cut into
4,000-character task inputs. It prints every flagged excerpt, to be read by a person.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sysconfig
import time
import timeit
from pathlib import Path

from ledgerbus.bus import codec
from ledgerbus.bus.events import TaskSubmitted
from ledgerbus.bus.redaction import find
from ledgerbus.router.checks import Inbound
from ledgerbus.router.checks.secrets import scan
from ledgerbus.router.state import RouterState

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

    return min(timeit.Timer(once, timer=time.process_time).repeat(number=number, repeat=repeat)) / number * 1e6


_TEXT = (".py", ".pyi", ".md", ".rst", ".txt", ".toml", ".cfg", ".json", ".yaml", ".yml", ".conf")
_TESTS = {"test", "tests", "testing"}


def real_text_files() -> list[Path]:
    """Installed libraries, the standard library and this repository, without tests."""
    paths = sysconfig.get_paths()
    site, stdlib = Path(paths["purelib"]), Path(paths["stdlib"])
    files = sorted(f for f in site.rglob("*") if f.suffix in _TEXT and f.is_file() and not _TESTS & set(f.parts))
    files += sorted(f for f in stdlib.rglob("*.py")
                    if not (_TESTS | {"site-packages", "idlelib"}) & set(f.relative_to(stdlib).parts))
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    files += [Path(f) for f in tracked if Path(f).suffix in _TEXT and not f.startswith("tests/")
              and f != "bus/redaction.py"]  # its own docs name what it finds
    return files


def real_text(chunk: int = 4_000) -> None:
    """Scan real text as task inputs; print the totals and every flagged excerpt."""
    files, chunks, size, flagged = real_text_files(), 0, 0, 0
    for path in files:
        text = path.read_text(errors="replace")
        size += len(text.encode())
        for i in range(0, len(text), chunk):
            chunks += 1
            data = codec.encode(TaskSubmitted(id="x", task_id="t", skill="echo", input={"text": text[i:i + chunk]}))
            if found := find(data):
                flagged += 1
                for f in found:
                    print(f"{path}: {f.kind}: {data[max(0, f.start - 60):f.end + 10]!r}")  # noqa: T201
    print(f"{len(files):,} files, {size / 1e6:.1f} MB, {chunks:,} inputs: {flagged} flagged "  # noqa: T201
          f"({flagged / max(chunks, 1):.3%})")


def main() -> None:
    """Print the scan's cost per message for both sizes (or, with --real-text, scan real text)."""
    parser = argparse.ArgumentParser(prog="python -m bench.secrets", description=__doc__)
    parser.add_argument("--real-text", action="store_true", help="count false positives on real text instead")
    if parser.parse_args().real_text:
        real_text()
        return
    for name, event, number in (("~300 B", small(), 5_000), ("20 KB", large(), 500)):
        size = len(codec.encode(event))
        print(f"{name:>7} ({size:,} bytes): {cost_us(event, number):7.1f} us per scan")  # noqa: T201 - a report


if __name__ == "__main__":
    main()
