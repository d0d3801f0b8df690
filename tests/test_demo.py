"""The no-key demo (docs/replay.md, "The demo"): the SOP pipeline, the ``plan`` skill and the
``reason`` loop answered from the recording shipped with the package.

- With the agents on the packaged demo profile (``agentctl demo profile``), ``agentctl demo
  sop`` runs the three with no model and no network: each completes with the recorded
  outputs, and every LLM call is ``replayed``.
- With the agents on no profile at all, it exits 1 with one line saying how to start the
  system on the demo profile.
- ``LEDGERBUS_WRITE_DEMO=1`` runs the generator instead: the same system, its calls served
  by fake models (tests/fakellm.py) scripted with the answers below, written for the demo;
  the three runs' recorded calls, exported with ``agentctl llm export``, become
  ``agents/llm/demo/demo.jsonl``. The recording comes from a real run of the system; only
  the model is a script.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.agentctl.demo import LABEL, PLAN_INPUT, REASON_INPUT, SOP_REQUIREMENT, START
from ledgerbus.agents.llm import calls
from ledgerbus.agents.llm.replay import Recording
from ledgerbus.bus.settings import Settings
from tests.fakellm import Answer, FakeLLM, answer
from tests.support import REPO, Procs, agentctl, wait_for_record
from tests.test_e2e import joined

DEMO = REPO / "agents" / "llm" / "demo"
WRITE = os.environ.get("LEDGERBUS_WRITE_DEMO") == "1"
TEAM = ["product-manager", "architect", "developer", "qa", "backend", "frontend", "devops", "testing"]
"""The Procfile's agent-team."""
PROFILES = {"LEDGERBUS_PROFILES_PATH": str(REPO / "profiles.toml")}
MODEL = "no-model-answers-written-for-this-demo"
"""The model the recording names, so that every recorded call says it: there was none."""

# -- the answers, written for the demo -----------------------------------------------------

SOP = {
    "product_manager": """\
# Product brief: a todo app

**Users and goals.** One person keeping track of their own tasks: note a task in seconds, see \
what is left, tick it off.

**User stories**

1. As a user I can add a todo with a title, so that I do not forget it.
   *Acceptance criteria:* a title of 1 to 200 characters (spaces trimmed) is saved and shown at \
the top of the list; an empty or longer title is refused with a message saying why.
2. As a user I can see my todos, open ones first.
   *Acceptance criteria:* the list shows every todo with its title and state; open todos come \
before done ones, newest first within each group.
3. As a user I can mark a todo done, and undo that.
   *Acceptance criteria:* the change shows at once and is still there after a reload.
4. As a user I can delete a todo.
   *Acceptance criteria:* a deleted todo leaves the list and does not come back after a reload.

**Out of scope:** accounts and sharing, due dates and reminders, mobile apps.

**Assumptions:** one user on one machine; todos are kept between sessions.

**Open question:** should done todos be cleared after some time?
""",
    "architect": """\
# Design: the todo app

**Components**

- `store` (Python, `sqlite3` from the standard library): the `todos` table and its four \
operations. Serves stories 1-4.
- `api` (Flask): a JSON HTTP API over `store`. Serves stories 1-4.
- `web` (one static HTML page, plain JavaScript): the list, the add form, the toggle and delete \
buttons, calling `api`. Serves stories 1-4 for a person.

**Data model:** `todos(id INTEGER PRIMARY KEY, title TEXT NOT NULL CHECK (length(title) BETWEEN \
1 AND 200), done INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL)`

**Interfaces**

| method | path | body | answer |
|---|---|---|---|
| GET | /todos | | 200, the todos: open first, newest first |
| POST | /todos | `{"title"}` | 201, the todo; 400 if the title is empty or too long |
| PATCH | /todos/ID | `{"done"}` | 200, the todo; 404 if there is none |
| DELETE | /todos/ID | | 204; 404 if there is none |

**Technology:** Flask (small and well known); sqlite3 (standard library, one file, survives \
restarts); no front-end framework (one page does not need one). No external service.

**Risks:** two tabs writing at once (SQLite serialises the writes: fine for one user); no \
authentication (out of scope), so the server listens on 127.0.0.1 only.
""",
    "developer": '''\
The store and the API, as designed, with their tests. One departure: the page (`web`) is not \
in this change; the API is complete without it, and the page comes next.

`store.py`

```python
import sqlite3
from datetime import datetime, timezone


class Store:
    def __init__(self, path="todos.db"):
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS todos (id INTEGER PRIMARY KEY,"
            " title TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200),"
            " done INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL)")

    def add(self, title):
        title = title.strip()
        if not 1 <= len(title) <= 200:
            raise ValueError("a title has 1 to 200 characters")
        with self.db:
            cur = self.db.execute("INSERT INTO todos (title, created_at) VALUES (?, ?)",
                                  (title, datetime.now(timezone.utc).isoformat()))
        return self.get(cur.lastrowid)

    def get(self, todo_id):
        row = self.db.execute("SELECT * FROM todos WHERE id = ?", (todo_id,)).fetchone()
        return {**dict(row), "done": bool(row["done"])} if row else None

    def list(self):
        rows = self.db.execute("SELECT * FROM todos ORDER BY done, created_at DESC, id DESC")
        return [{**dict(r), "done": bool(r["done"])} for r in rows]

    def set_done(self, todo_id, done):
        with self.db:
            self.db.execute("UPDATE todos SET done = ? WHERE id = ?", (int(done), todo_id))
        return self.get(todo_id)

    def delete(self, todo_id):
        with self.db:
            return self.db.execute("DELETE FROM todos WHERE id = ?", (todo_id,)).rowcount == 1
```

`api.py`

```python
from flask import Flask, jsonify, request

from store import Store


def create_app(path="todos.db"):
    app, store = Flask(__name__), Store(path)

    @app.get("/todos")
    def list_todos():
        return jsonify(store.list())

    @app.post("/todos")
    def add_todo():
        body = request.get_json(silent=True) or {}
        try:
            return jsonify(store.add(str(body.get("title", "")))), 201
        except ValueError as exc:
            return jsonify(error=str(exc)), 400

    @app.patch("/todos/<int:todo_id>")
    def set_done(todo_id):
        body = request.get_json(silent=True) or {}
        todo = store.set_done(todo_id, bool(body.get("done")))
        return (jsonify(todo), 200) if todo else (jsonify(error="no such todo"), 404)

    @app.delete("/todos/<int:todo_id>")
    def delete_todo(todo_id):
        return ("", 204) if store.delete(todo_id) else (jsonify(error="no such todo"), 404)

    return app
```

`test_api.py`

```python
from api import create_app


def client(tmp_path):
    return create_app(str(tmp_path / "todos.db")).test_client()


def test_add_list_mark_done_and_delete(tmp_path):
    c = client(tmp_path)
    milk = c.post("/todos", json={"title": "buy milk"}).get_json()
    c.post("/todos", json={"title": "call Ada"})
    assert [t["title"] for t in c.get("/todos").get_json()] == ["call Ada", "buy milk"]
    assert c.patch(f"/todos/{milk['id']}", json={"done": True}).get_json()["done"] is True
    c.post("/todos", json={"title": "water plants"})
    assert [t["title"] for t in c.get("/todos").get_json()] == ["water plants", "call Ada", "buy milk"]
    assert c.delete(f"/todos/{milk['id']}").status_code == 204
    assert c.delete(f"/todos/{milk['id']}").status_code == 404


def test_an_empty_title_is_refused(tmp_path):
    assert client(tmp_path).post("/todos", json={"title": "   "}).status_code == 400
```

Run it: `pip install flask pytest`, then `flask --app api:create_app run` (it listens on \
127.0.0.1:5000); the tests: `pytest`.
''',
    "qa": '''\
# QA report: the todo app

**Test plan.** The API against each acceptance criterion, with Flask's test client: the \
developer's `test_api.py` and the cases below, all run with `pytest`. The page is not \
delivered yet, so nothing is tested through it.

**Added test cases** (in `test_api.py`)

```python
def test_a_title_over_200_characters_is_refused(tmp_path):
    assert client(tmp_path).post("/todos", json={"title": "x" * 201}).status_code == 400


def test_todos_are_still_there_after_a_restart(tmp_path):
    client(tmp_path).post("/todos", json={"title": "keep me"})
    assert [t["title"] for t in client(tmp_path).get("/todos").get_json()] == ["keep me"]


def test_marking_an_unknown_todo_is_404(tmp_path):
    assert client(tmp_path).patch("/todos/99", json={"done": True}).status_code == 404
```

**Acceptance criteria**

| story | criterion | result |
|---|---|---|
| 1 add | a 1-200 character title is saved and shown first | passed |
| 1 add | an empty or longer title is refused with a message | passed |
| 2 list | open before done, newest first in each | passed |
| 3 done | the change shows at once, survives a reload | passed for the API; untested in the page |
| 4 delete | gone, and stays gone after a reload | passed for the API; untested in the page |

**Defects**

- D1 (minor): `PATCH /todos/ID` with no body marks the todo *not done* instead of refusing \
the request. Reproduce: `curl -X PATCH localhost:5000/todos/1` answers 200 and `"done": false`; \
expected 400.

**Not tested:** the page (not delivered); two tabs writing at once.
''',
}

PLAN = {"steps": [
    {"id": "backend", "capabilities": ["backend", "flask"],
     "input": {"prompt": "Set up the backend of a todo app: a Flask API with GET and POST /todos and PATCH and "
                         "DELETE /todos/<id>, kept in SQLite, with pytest tests."}},
    {"id": "frontend", "capabilities": ["frontend", "react"],
     "input": {"prompt": "Set up the frontend of a todo app: a React page that lists, adds, ticks off and deletes "
                         "todos through the backend's /todos API, with component tests."}},
    {"id": "test_both", "capabilities": ["testing", "e2e"], "deps": ["backend", "frontend"], "priority": 7,
     "input": {"prompt": "Test the backend and the frontend together: API tests, and one end-to-end test through "
                         "the page; say what each covers and what is left untested."}},
]}

STEPS = {
    "backend": '''\
`app.py`: the API, on SQLite.

```python
import sqlite3

from flask import Flask, g, jsonify, request

app = Flask(__name__)
app.config["DATABASE"] = "todos.db"


def db():
    if "db" not in g:
        g.db = sqlite3.connect(app.config["DATABASE"])
        g.db.row_factory = sqlite3.Row
        g.db.execute("CREATE TABLE IF NOT EXISTS todos (id INTEGER PRIMARY KEY, title TEXT NOT NULL,"
                     " done INTEGER NOT NULL DEFAULT 0)")
    return g.db


@app.teardown_appcontext
def close(_):
    if (conn := g.pop("db", None)) is not None:
        conn.close()


def row(r):
    return {"id": r["id"], "title": r["title"], "done": bool(r["done"])}


@app.get("/todos")
def list_todos():
    return jsonify([row(r) for r in db().execute("SELECT * FROM todos ORDER BY done, id DESC")])


@app.post("/todos")
def add_todo():
    title = str((request.get_json(silent=True) or {}).get("title", "")).strip()
    if not title:
        return jsonify(error="a todo needs a title"), 400
    with db() as conn:
        todo_id = conn.execute("INSERT INTO todos (title) VALUES (?)", (title,)).lastrowid
    return jsonify(row(db().execute("SELECT * FROM todos WHERE id = ?", (todo_id,)).fetchone())), 201


@app.patch("/todos/<int:todo_id>")
def mark(todo_id):
    done = bool((request.get_json(silent=True) or {}).get("done"))
    with db() as conn:
        found = conn.execute("UPDATE todos SET done = ? WHERE id = ?", (int(done), todo_id)).rowcount
    if not found:
        return jsonify(error="no such todo"), 404
    return jsonify(row(db().execute("SELECT * FROM todos WHERE id = ?", (todo_id,)).fetchone()))


@app.delete("/todos/<int:todo_id>")
def delete(todo_id):
    with db() as conn:
        found = conn.execute("DELETE FROM todos WHERE id = ?", (todo_id,)).rowcount
    return ("", 204) if found else (jsonify(error="no such todo"), 404)
```

`test_app.py`: one test per endpoint.

```python
import pytest

from app import app


@pytest.fixture
def client(tmp_path):
    app.config["DATABASE"] = str(tmp_path / "todos.db")
    return app.test_client()


def test_post_then_get(client):
    assert client.post("/todos", json={"title": "buy milk"}).status_code == 201
    assert client.get("/todos").get_json() == [{"id": 1, "title": "buy milk", "done": False}]


def test_post_without_a_title_is_400(client):
    assert client.post("/todos", json={}).status_code == 400


def test_patch_marks_done(client):
    client.post("/todos", json={"title": "buy milk"})
    assert client.patch("/todos/1", json={"done": True}).get_json()["done"] is True
    assert client.patch("/todos/2", json={"done": True}).status_code == 404


def test_delete(client):
    client.post("/todos", json={"title": "buy milk"})
    assert client.delete("/todos/1").status_code == 204
    assert client.delete("/todos/1").status_code == 404
```

Run: `pip install flask pytest`, `flask run` (127.0.0.1:5000), `pytest`.
''',
    "frontend": '''\
`src/Todos.jsx`: the page, calling only the backend's `/todos` endpoints.

```jsx
import { useEffect, useState } from "react";

const json = (r) => (r.ok ? (r.status === 204 ? null : r.json()) : Promise.reject(r));

export default function Todos({ api = "/todos" }) {
  const [todos, setTodos] = useState([]);
  const [title, setTitle] = useState("");
  const reload = () => fetch(api).then(json).then(setTodos);
  useEffect(() => { reload(); }, []);

  const send = (url, method, body) =>
    fetch(url, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(json).then(reload);

  return (
    <main>
      <form onSubmit={(e) => { e.preventDefault(); send(api, "POST", { title }).then(() => setTitle("")); }}>
        <input aria-label="new todo" value={title} onChange={(e) => setTitle(e.target.value)} />
        <button disabled={!title.trim()}>Add</button>
      </form>
      <ul>
        {todos.map((t) => (
          <li key={t.id}>
            <label>
              <input type="checkbox" checked={t.done} onChange={() => send(`${api}/${t.id}`, "PATCH", { done: !t.done })} />
              {t.title}
            </label>
            <button aria-label={`delete ${t.title}`} onClick={() => send(`${api}/${t.id}`, "DELETE")}>×</button>
          </li>
        ))}
      </ul>
    </main>
  );
}
```

`src/Todos.test.jsx` (Vitest and Testing Library, `fetch` stubbed):

```jsx
import { render, screen, fireEvent, waitFor } from "@testing-library/react";
import { vi, test, expect } from "vitest";
import Todos from "./Todos";

test("lists the todos and adds one", async () => {
  const todos = [{ id: 1, title: "buy milk", done: false }];
  globalThis.fetch = vi.fn((url, opts) => {
    if (opts?.method === "POST") todos.unshift({ id: 2, title: "call Ada", done: false });
    return Promise.resolve({ ok: true, status: 200, json: () => Promise.resolve([...todos]) });
  });
  render(<Todos />);
  expect(await screen.findByText("buy milk")).toBeTruthy();
  fireEvent.change(screen.getByLabelText("new todo"), { target: { value: "call Ada" } });
  fireEvent.click(screen.getByText("Add"));
  await waitFor(() => expect(screen.getByText("call Ada")).toBeTruthy());
});
```

Run: `npm create vite@latest todo-ui -- --template react`, add these two files, `npm install -D vitest \
@testing-library/react jsdom`, `npx vitest --environment jsdom`; in development, proxy `/todos` to \
127.0.0.1:5000 in `vite.config.js`.
''',
    "test_both": '''\
The whole, tested from outside: the API over HTTP, then the page in a browser.

`tests/test_api_http.py` (pytest and `requests`, against `flask run` on 127.0.0.1:5000):

```python
import requests

BASE = "http://127.0.0.1:5000/todos"


def test_a_todo_goes_through_its_life():
    todo = requests.post(BASE, json={"title": "e2e todo"}).json()
    assert any(t["id"] == todo["id"] for t in requests.get(BASE).json())
    assert requests.patch(f"{BASE}/{todo['id']}", json={"done": True}).json()["done"] is True
    assert requests.delete(f"{BASE}/{todo['id']}").status_code == 204
    assert requests.delete(f"{BASE}/{todo['id']}").status_code == 404
```

`tests/test_page.py` (pytest-playwright, against the page served by Vite on 127.0.0.1:5173):

```python
from playwright.sync_api import Page, expect


def test_add_tick_off_and_delete_through_the_page(page: Page):
    page.goto("http://127.0.0.1:5173")
    page.get_by_label("new todo").fill("water plants")
    page.get_by_role("button", name="Add").click()
    item = page.get_by_role("listitem").filter(has_text="water plants")
    expect(item).to_be_visible()
    item.get_by_role("checkbox").check()
    page.reload()
    expect(item.get_by_role("checkbox")).to_be_checked()
    item.get_by_role("button", name="delete water plants").click()
    expect(item).to_have_count(0)
```

**What each covers:** the first, every endpoint over real HTTP, in the order a user meets them; \
the second, adding, ticking off (kept over a reload) and deleting through the page.

**Left untested:** a title that is empty or too long through the page (the button is disabled, \
the API's 400 is covered by the backend's tests); two browsers at once; errors from the API \
shown in the page (it shows none yet).
''',
}

REASON = [
    {"facts": ["The goal: check that echo gives back exactly what it is given, and say so in one sentence.",
               "Nothing has been tried yet.", "The only skill I may act with is echo."]},
    {"analysis": "Without calling echo there is no evidence either way. Start with a plain input whose echo is easy "
                 "to compare.", "missing": ["what echo returns for a known input"]},
    {"actions": [{"skill": "echo", "input": {"text": "hello, ledgerbus"}, "why": "a plain input, easy to compare"}]},
    {"done": False, "progress": 0.5,
     "feedback": "One plain ASCII string came back unchanged, but 'exactly' needs more than that: try non-ASCII text "
                 "and a number in the same input."},
    {"facts": ['echo returned {"text": "hello, ledgerbus"} for that same input.',
               "Validation asked for non-ASCII text and a number."]},
    {"analysis": "An input with accents, a symbol and an integer shows whether echo keeps characters and types, not "
                 "only plain strings.", "missing": ["what echo returns for a mixed input"]},
    {"actions": [{"skill": "echo", "input": {"text": "héllo ✓", "n": 42}, "why": "non-ASCII text and a number"}]},
    {"done": True, "progress": 1.0,
     "answer": "The echo skill gave back both inputs exactly as given, the non-ASCII text and the number included."},
]

SCRIPT: dict[str, list[Answer]] = {
    **{role.replace("_", "-"): [answer(text)] for role, text in SOP.items()},
    "backend": [answer(STEPS["backend"])], "frontend": [answer(STEPS["frontend"])],
    "testing": [answer(STEPS["test_both"])],
    "plan": [answer(data=PLAN)], "reason": [answer(data=phase) for phase in REASON],
}
"""Each speaker's answers, in order: the roles (their agents' calls route by role) and the
thinker's two skills. One fake model each, so the backend and frontend steps, which run at
the same time, each get their own answer."""


def generator_routing(fakes: dict[str, FakeLLM]) -> str:
    """The routing file of the recorded run: each speaker on its own fake model."""
    parts = []
    for name, fake in fakes.items():
        table = f'skills."{name}"' if name in ("plan", "reason") else f'roles."{name}"'
        parts.append(f'[providers.fake-{name}]\ntype = "anthropic"\nbase_url = "{fake.url}"\ntimeout_s = 10\n\n'
                     f'[{table}]\nprovider = "fake-{name}"\nmodel = "{MODEL}"\nmax_tokens = 4096\n')
    return "\n".join(parts)


# -- the system, as the Procfile runs it -------------------------------------------------


async def start_demo_system(procs: Procs, admin: Client, **env: str) -> None:
    """Router, projector, thinker-1 (llm.chat, plan, reason), echo-1 and the team agent of the
    Procfile, the agents with ``env``."""
    await procs.start("router", "router")
    await procs.start("projector", "projector")
    await procs.start("thinker-1", "agent", "--name", "thinker-1", "--skills", "llm.chat,plan,reason",
                      "--concurrency", "4", **env)
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", "--concurrency", "8", **env)
    await procs.start("team", "agent", *[a for name in TEAM for a in ("--profile", name)], **PROFILES, **env)
    for name in ["thinker-1", "echo-1", *TEAM]:
        await wait_for_record(admin.jetstream(), joined(name))


def recorded() -> list[calls.CallRecord]:
    """The calls of the shipped recording, in the order they were made."""
    recording = Recording.from_file(DEMO / "demo.jsonl")
    return sorted((record for _, record in recording.by_place.values()), key=lambda r: r.at)


# -- the demo ------------------------------------------------------------------------------


@pytest.mark.skipif(WRITE, reason="LEDGERBUS_WRITE_DEMO=1 writes the recording this test reads")
async def test_the_demo_runs_the_pipeline_plan_and_reason_loop_from_the_shipped_recording_with_no_model(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    code, out, err = await agentctl(settings, "demo", "profile")
    assert code == 0, err
    profile = Path(out.strip())
    assert profile.resolve() == (DEMO / "llm.toml").resolve()
    assert "EVERY ANSWER IS RECORDED, NOT A MODEL'S" in profile.read_text()
    # No key, and no model: every call has the shipped recording to answer it, or fails.
    await start_demo_system(procs, admin, LEDGERBUS_LLM_CONFIG_PATH=str(profile), ANTHROPIC_API_KEY="",
                            OPENAI_API_KEY="")
    code, out, err = await agentctl(settings, "demo", "sop", "--json", "--timeout", "20", env=PROFILES, timeout=40)
    assert code == 0, out + err
    shown = json.loads(out)
    assert shown["recorded"] == LABEL

    sop, plan, reason = shown["sop"], shown["plan"], shown["reason"]
    assert {role: sop["output"]["outputs"][role]["text"] for role in SOP} == SOP
    assert {sop["output"]["outputs"][role]["model"] for role in SOP} == {MODEL}  # and says so
    assert {role: sop["steps"][role]["agent"] for role in SOP} == {r: r.replace("_", "-") for r in SOP}

    assert plan["output"]["status"] == "completed"
    assert [s["id"] for s in plan["output"]["steps"]] == [s["id"] for s in PLAN["steps"]]
    assert {k: v["text"] for k, v in plan["output"]["output"]["outputs"].items()} == STEPS

    assert {k: reason["output"][k] for k in ("answer", "iterations", "restarts")} == (
        {"answer": REASON[-1]["answer"], "iterations": 2, "restarts": 0})
    phases = ["observe", "reason", "plan", "act", "validate"]
    assert [(t["iteration"], t["phase"]) for t in reason["thoughts"]] == [(i, p) for i in (1, 2) for p in phases]
    assert reason["thoughts"][3]["output"] == [{"skill": "echo", "output": {"text": "hello, ledgerbus"}}]
    assert reason["thoughts"][4]["output"]["done"] is False

    # Every answer came from the recording, call for call, and cost nothing.
    shipped = {calls.call_hash(line) for line in (DEMO / "demo.jsonl").read_bytes().splitlines() if line.strip()}
    for run, count in ((sop, 4), (plan, 4), (reason, 8)):
        assert len(run["calls"]) == count, run["calls"]
        assert {(c["outcome"], c["provider"], c["model"], c["tokens_in"], c["cost_usd"]) for c in run["calls"]} == {
            ("replayed", "demo", MODEL, 0, 0.0)}
        assert {c["call"] for c in run["calls"]} <= shipped


async def test_the_demo_says_how_to_start_the_system_on_its_profile_when_the_agents_are_not(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    # As `honcho start` with no key: here, no routing file at all.
    assert not settings.llm_config_path.exists()
    await start_demo_system(procs, admin)
    code, out, err = await agentctl(settings, "demo", "sop", "--timeout", "20", env=PROFILES, timeout=40)
    assert code == 1, out + err
    [line] = err.splitlines()
    assert line.startswith("agentctl: the demo's SOP pipeline ") and " failed: " in line, line
    assert line.endswith(f"start the system with `{START}`"), line


# -- the generator ---------------------------------------------------------------------------


@pytest.mark.skipif(not WRITE, reason="writes agents/llm/demo/demo.jsonl: run with LEDGERBUS_WRITE_DEMO=1")
async def test_write_the_demo_recording(
    procs: Procs, admin: Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with contextlib.ExitStack() as stack:
        fakes = {name: stack.enter_context(FakeLLM(*replies)) for name, replies in SCRIPT.items()}
        settings.llm_config_path.write_text(generator_routing(fakes))
        monkeypatch.setenv("ANTHROPIC_API_KEY", "not-a-key-the-models-are-fakes")
        await start_demo_system(procs, admin)
        runs = [("sop", ["submit", "--pipeline", "sop", SOP_REQUIREMENT]),
                ("plan", ["submit", "plan", "--input", json.dumps(PLAN_INPUT)]),
                ("reason", ["submit", "reason", "--input", json.dumps(REASON_INPUT)])]
        ids = []
        for name, args in runs:
            code, out, err = await agentctl(settings, *args, "--wait", "--json", "--timeout", "60", env=PROFILES,
                                            timeout=90)
            assert code == 0, (name, out, err)
            ids.append(json.loads(out)["task_id"])
        # Each fake model was asked exactly as often as it had answers: none answered by echoing.
        assert {name: len(fake.requests) for name, fake in fakes.items()} == {
            name: len(replies) for name, replies in SCRIPT.items()}
    lines = b""
    for task_id in ids:
        path = tmp_path / f"{task_id}.jsonl"
        code, out, err = await agentctl(settings, "llm", "export", task_id, "-o", str(path))
        assert code == 0, err
        lines += path.read_bytes()
    (DEMO / "demo.jsonl").write_bytes(lines)
    made = recorded()
    assert len(made) == 16 and {r.model for r in made} == {MODEL}
    assert [r.path for r in made[:4]] == [f"plan/{role}" for role in SOP]
