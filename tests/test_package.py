"""ledgerbus as a user installs it: the built wheel (not this checkout), in a fresh virtual
environment outside the repository, beside another package that owns the name `agents`;
`agentctl init` makes a project, `honcho start` runs it, a subdirectory of it submits
through the CLI and through the client example of docs/client.md, and Ctrl-C stops it in
order (the clients first, the nats-server last)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO

TOP_LEVEL = ("bus", "router", "agents", "projections", "plugins", "agentctl")
"""The repository's top-level folders: installed only as ledgerbus.<name>."""
SOURCES = [*TOP_LEVEL, "ledgerbus", "tests", "bench", "examples"]


def test_nothing_imports_the_top_level_folders_by_their_bare_names() -> None:
    """From the repository's root `import agents` would find the folder; installed, only
    ledgerbus.agents exists (and `agents` may be someone else's package)."""
    found = []
    for folder in SOURCES:
        for path in (REPO / folder).rglob("*.py"):
            if ".venv" in path.parts or path.is_relative_to(REPO / "ledgerbus") and path.parent != REPO / "ledgerbus":
                continue  # ledgerbus/<name> are the links to the folders scanned already
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in TOP_LEVEL]
    assert not found, found


def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` names itself in UV
    assert uv, "uv is not on PATH (.ci/run and the README install it)"
    return uv


def _run(args: list[str], timeout: float = 300, **kwargs: object) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return str(proc.stdout)


@pytest.fixture
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout and
    openai-agents, every version pinned by uv.lock; its bin/ directory."""
    root = tmp_path_factory.mktemp("installed")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    _run([_uv(), "build", "--wheel", "--out-dir", str(root / "dist"), str(REPO)], env=env)
    [wheel] = (root / "dist").glob("ledgerbus-*.whl")
    constraints = root / "constraints.txt"
    constraints.write_text(_run([_uv(), "export", "--frozen", "--no-hashes", "--no-emit-project", "--extra", "test",
                                 "--extra", "local"], cwd=REPO, env=env))
    _run([_uv(), "venv", "--quiet", "--python", sys.executable, str(root / "venv")], env=env)
    python = root / "venv" / "bin" / "python"
    _run([_uv(), "pip", "install", "--quiet", "--python", str(python), f"ledgerbus[local] @ {wheel.as_uri()}",
          "openai-agents", "-c", str(constraints)], env=env)
    return python.parent


def test_the_wheel_installs_beside_openai_agents_and_runs_a_project_from_a_subdirectory(
    installed: Path, tmp_path: Path
) -> None:
    # Both import, each its own: openai-agents' `agents` and ledgerbus.agents.
    out = _run([str(installed / "python"), "-c", (
        "import agents, ledgerbus, ledgerbus.agents.skill as s, ledgerbus.bus.codec\n"
        "print(agents.Agent.__module__, s.Skill.__module__, ledgerbus.connect.__module__)\n"
        "import importlib.resources as r; print(r.files('ledgerbus').joinpath('py.typed').is_file())")],
        cwd=tmp_path)
    assert out.split() == ["agents.agent", "ledgerbus.agents.skill", "ledgerbus.client", "True"]
    site = Path(_run([str(installed / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).strip())
    ours = {p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))}
    assert not ours & set(TOP_LEVEL) - {"agents"}, "the wheel installed a generic top-level package"
    assert (site / "agents" / "agent.py").is_file()  # openai-agents' own, not overwritten
    # The no-key demo's profile and recording are in the wheel, where `agentctl demo profile` says.
    profile = Path(_run([str(installed / "agentctl"), "demo", "profile"], cwd=tmp_path).strip())
    assert profile == site / "ledgerbus" / "agents" / "llm" / "demo" / "llm.toml", profile
    shipped = REPO / "agents" / "llm" / "demo" / "demo.jsonl"
    assert (profile.parent / "demo.jsonl").read_bytes() == shipped.read_bytes()
    _run_a_project(installed, tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_a_project(installed: Path, tmp_path: Path) -> None:
    """`agentctl init`, `honcho start` in the project, the CLI and the client from below it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LEDGERBUS_", "OTEL_")) and k not in ("VIRTUAL_ENV", "GOMAXPROCS")}
    env.update(PATH=f"{installed}{os.pathsep}{env['PATH']}", LEDGERBUS_CLI_NAME="tester")
    project = tmp_path / "x"
    _run([str(installed / "agentctl"), "init", str(project)], env=env, cwd=tmp_path)
    assert sorted(p.name for p in project.iterdir()) == [
        ".gitignore", "Procfile", "README.md", "llm.toml", "nats.conf", "policy.toml", "profiles.toml", "var"]
    port = _free_port()
    conf = project / "nats.conf"
    conf.write_text(re.sub(r"(?m)^listen: .*$", f"listen: 127.0.0.1:{port}", conf.read_text()))
    env["LEDGERBUS_URL"] = f"nats://127.0.0.1:{port}"
    web = f"http://127.0.0.1:{_free_port()}"
    env["LEDGERBUS_WEB_PORT"] = web.rsplit(":", 1)[1]
    # The shipped Procfile's bus, routers, projector, echo agent and gateway, their command
    # lines as shipped (the LLM agents are not needed here, and cost a loaded machine seconds
    # to start).
    procfile = project / "Procfile"
    procfile.write_text("".join(line for line in procfile.read_text().splitlines(keepends=True) if line.startswith(
        ("nats:", "router:", "router-standby:", "projector:", "agent-echo:", "web:"))))
    deep = project / "src" / "deep"
    deep.mkdir(parents=True)
    log = (tmp_path / "honcho.log").open("w")
    honcho = subprocess.Popen([str(installed / "honcho"), "start"], cwd=project, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            proc = subprocess.run([str(installed / "agentctl"), "agents", "--json"], cwd=deep, env=env,
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode == 0 and '"echo-1"' in proc.stdout and '"online"' in proc.stdout:
                break
            assert honcho.poll() is None and time.monotonic() < deadline, (
                f"echo-1 never came online: {proc.stderr}\n{(tmp_path / 'honcho.log').read_text()[-3000:]}")
            time.sleep(0.5)
        # From a subdirectory, the CLI finds the project (its credentials, its settings).
        out = _run([str(installed / "agentctl"), "submit", "echo", "--input", '{"text": "from below"}', "--wait",
                    "--json"], cwd=deep, env=env)
        assert '"output": {\n    "text": "from below"\n  }' in out
        # The worked example of docs/client.md, as a user would run it.
        example = (REPO / "docs" / "client.md").read_text().split("<!-- example: quickstart -->")[1]
        code = example.split("```python\n")[1].split("```")[0]
        (deep / "example.py").write_text(code)
        out = _run([str(installed / "python"), "example.py"], cwd=deep, env=env)
        assert out.splitlines()[:2] == ["{'text': 'hello'}", "rejected (invalid_input)"], out
        assert out.splitlines()[2].startswith("completed task by echo-1 in "), out
        _the_http_api_as_docs_web_md_shows_it(installed, deep, env, web)
        # `agentctl nats` gives the server half the cores for Go code (bus/server.py).
        servers = [pid for pid in _leftovers(project) if Path(f"/proc/{pid}/comm").read_text().strip() == "nats-server"]
        assert len(servers) == 1, servers
        assert _environ(servers[0])["GOMAXPROCS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    finally:
        os.killpg(honcho.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends honcho's process group
        try:
            honcho.wait(timeout=15)
        finally:
            if honcho.poll() is None:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait()
            stragglers = _leftovers(project)
            for pid in stragglers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            log.close()
    out = (tmp_path / "honcho.log").read_text(errors="replace")
    assert (project / "var" / "jetstream").is_dir() and (project / "var" / "ledgerbus.db").is_file()
    # Ctrl-C: the agents, routers and projector drain and leave first, the nats-server last
    # (`agentctl nats` holds it back until its clients are gone): no connection errors, and
    # honcho kills nothing.
    assert not stragglers, f"processes outlived honcho: {stragglers}\n{out}"
    assert "SIGKILL" not in out and "Traceback" not in out, out
    trouble = [line for line in out.splitlines()
               if not re.match(r"^\S+ (nats|system)\.?\d*\s+\|", line) and _CONNECTION_TROUBLE.search(line)]
    assert not trouble, "\n".join(trouble) + "\n\n" + out
    assert re.search(r"agentctl: waiting up to \S+ s for \d+ clients? to disconnect before stopping nats-server",
                     out), out
    # Every client had disconnected when the server stopped (a process may still be
    # tearing its interpreter down, on a loaded machine, after its connection closed).
    assert "still connected" not in out, out
    assert len(_STOPPED.findall(out)) == len(procfile.read_text().splitlines()), out


_STOPPED = re.compile(r"^\S+ system\s+\| (\S+)\.\d+ stopped \(rc=", re.MULTILINE)
_CONNECTION_TROUBLE = re.compile(
    r"nats_error|nats_disconnected|nats_reconnected|fetch_failed|refused|connect call failed|unexpected EOF|"
    r"server shutdown|\[error", re.IGNORECASE)
"""What a client logs when the server goes first (nats-server's own lines are not checked)."""


def _environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with."""
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def _leftovers(directory: Path) -> list[int]:
    """Processes still working in ``directory`` or under it (all started by the test)."""
    root = directory.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cwd = Path(os.readlink(entry / "cwd"))
                if cwd == root or root in cwd.parents:
                    found.append(int(entry.name))
    return found


def _the_http_api_as_docs_web_md_shows_it(installed: Path, cwd: Path, env: dict[str, str], web: str) -> None:
    """The README's curl calls against the gateway `honcho start` ran, and the control
    center's page and scripts served from the installed wheel."""
    token = _run([str(installed / "agentctl"), "keys", "token", "add", "tester"], cwd=cwd, env=env).strip()
    auth = ["-H", f"Authorization: Bearer {token}"]

    def curl(*args: str) -> str:
        return _run(["curl", "-sS", "--fail-with-body", "--retry", "30", "--retry-connrefused", "--retry-delay", "1",
                     *args], cwd=cwd, env=env)

    assert json.loads(curl(f"{web}/healthz")) == {"ok": True}
    made = json.loads(curl("-X", "POST", f"{web}/tasks", *auth, "-H", "Content-Type: application/json",
                           "-d", '{"skill": "echo", "input": {"text": "over http"}}'))
    assert made["status"] == "submitted", made
    for _ in range(100):
        task = json.loads(curl(f"{web}/tasks/{made['task_id'][:8]}", *auth))
        if task["status"] == "completed":
            break
        time.sleep(0.1)
    assert (task["output"], task["submitted_by"], task["agent"]) == ({"text": "over http"}, "cli-tester", "echo-1")
    assert [a["name"] for a in json.loads(curl(f"{web}/agents", *auth))] == ["echo-1"]
    assert "<title>ledgerbus control center</title>" in curl(f"{web}/")
    assert "function drawDag" in curl(f"{web}/ui/app.js")
