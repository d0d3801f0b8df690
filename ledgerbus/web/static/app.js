// ledgerbus control center: plain JavaScript over the HTTP API (docs/web.md), no build step.
// Every value from the bus reaches the page as text (textContent), never as HTML.

const TOKEN_KEY = "ledgerbus.token";
const TERMINAL = new Set(["completed", "failed", "denied", "cancelled", "skipped", "rejected"]);
const STATUSES = ["waiting", "awaiting_approval", "unmatched", "pending", "running", "retrying",
                  "completed", "failed", "denied", "cancelled", "skipped"];
const TRACE_AFTER_END = 4;  // refreshes of a finished task's trace, a second apart
const SERVICE_COLOURS = ["#2563eb", "#9333ea", "#059669", "#d97706", "#db2777", "#0891b2", "#65a30d", "#7c3aed"];

// ---- DOM ------------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, kids);
  return el;
}

function s(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(el, attrs);
  append(el, kids);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : v);
  }
}

function append(el, kids) {
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    el.append(k instanceof Node ? k : String(k));
  }
}

const $ = (sel, root = document) => root.querySelector(sel);

// ---- formatting -----------------------------------------------------------------------

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 1) return "just now";
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function seconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "";
  if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;
  if (s < 120) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
}

function took(task) {
  if (!task.started_at) return "";
  const end = task.finished_at ? Date.parse(task.finished_at) : Date.now();
  const took = (end - Date.parse(task.started_at)) / 1000;
  return took < 0.001 ? "< 1 ms" : seconds(took);  // the log's times are to the millisecond
}

const when = (iso) => iso ? h("span", { title: iso }, ago(iso)) : "";
const short = (id) => id && id.length > 14 ? `${id.slice(0, 10)}…` : id;
const badge = (status) => h("span", { class: `badge s-${status}` }, (status || "").replaceAll("_", " "));
const taskLink = (id, text) => h("a", { href: `#/task/${encodeURIComponent(id)}`, class: "id", title: id }, text || short(id));
const json = (v) => JSON.stringify(v, null, 2);
const what = (t) => t.step ? `${t.step}` : (t.kind === "plan" ? (t.input && t.input.name) || "plan" : t.skill);

// ---- the API --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const token = () => localStorage.getItem(TOKEN_KEY) || "";

async function api(path, { method = "GET", body } = {}) {
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${token()}`, ...(body !== undefined ? { "Content-Type": "application/json" } : {}) },
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
  } catch (exc) {
    setLive(false, "gateway unreachable");
    throw new ApiError(0, "unreachable", "the gateway does not answer (is `agentctl web` running?)");
  }
  const type = res.headers.get("content-type") || "";
  const data = type.includes("json") ? await res.json() : await res.text();
  if (res.status === 401) {
    setLive(false, "signed out");
    login(data.message);
    throw new ApiError(401, "unauthorized", data.message);
  }
  setLive(res.status !== 503, res.status === 503 ? "bus unavailable" : "live");
  if (!res.ok) throw new ApiError(res.status, data.code || "error", data.message || String(data));
  return data;
}

function setLive(up, text) {
  const el = $("#live");
  el.className = `live ${up ? "up" : "down"}`;
  $("#live-text").textContent = text;
}

// ---- toasts and confirmation -----------------------------------------------------------

function toast(text, bad = false) {
  const el = h("div", { class: `toast${bad ? " bad" : ""}`, role: "status" }, text);
  $("#toasts").append(el);
  setTimeout(() => el.remove(), bad ? 9000 : 4500);
}

function failed(exc) {
  if (exc.status !== 401) toast(exc.code && exc.code !== "error" ? `${exc.code}: ${exc.message}` : exc.message, true);
}

/** Ask before an action; resolves to the reason typed, or null when cancelled. */
function confirmAction(title, body, { okText = "Confirm", danger = false, reason = true,
                                     field = "Reason (recorded in the audit log)" } = {}) {
  const dialog = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-body").textContent = body;
  $("#confirm-reason-label").hidden = !reason;
  $("#confirm-reason-label").firstChild.textContent = field;
  $("#confirm-reason").value = "";
  const ok = $("#confirm-ok");
  ok.textContent = okText;
  ok.className = danger ? "danger" : "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? $("#confirm-reason").value : null),
                            { once: true });
  });
}

async function act(title, body, call, done, options) {
  const reason = await confirmAction(title, body, options);
  if (reason === null) return;
  try {
    const record = await call(reason);
    toast(done(record));
    refreshNow();
  } catch (exc) {
    failed(exc);
  }
}

// ---- pages and routing ----------------------------------------------------------------

let generation = 0;
let timers = [];
let refreshers = [];

/** Run ``fn`` now and every ``ms`` while the page is shown. An error shows above the page
 * (a task nobody knows, the projector still starting) until a later run succeeds. */
async function every(ms, fn) {
  const gen = generation;
  const tick = async () => {
    if (gen !== generation) return;
    try {
      await fn();
      if (gen === generation) pageError(null);
    } catch (exc) {
      if (!(exc instanceof ApiError)) console.error(exc);
      else if (exc.status !== 401 && gen === generation) pageError(exc);
    }
  };
  timers.push(setInterval(tick, ms));
  refreshers.push(tick);
  await tick();
}

function pageError(exc) {
  let box = $("#page-error");
  if (!exc) {
    if (box) box.remove();
    return;
  }
  if (!box) {
    box = h("div", { id: "page-error", class: "error-box", role: "alert" });
    $("#view").prepend(box);
  }
  box.textContent = exc.code && exc.code !== "error" ? `${exc.code}: ${exc.message}` : exc.message;
}

const refreshNow = () => refreshers.forEach((fn) => fn());

function route() {
  const hash = location.hash || "#/tasks";
  if (hash.startsWith("#token=")) {  // a sign-in link: the token rides in the fragment, never sent to a server
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(hash.slice(7)));
    history.replaceState(null, "", "#/tasks");
    whoami().then(pollApprovals, () => {});
    return route();
  }
  generation += 1;
  timers.forEach(clearInterval);
  timers = [];
  refreshers = [];
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const pages = { tasks: tasksPage, task: taskPage, submit: submitPage, agents: agentsPage, agent: agentPage,
                  approvals: approvalsPage, audit: auditPage };
  const page = pages[parts[0]] || tasksPage;
  document.querySelectorAll("nav a").forEach((a) => {
    const nav = a.dataset.nav;
    a.classList.toggle("active", nav === parts[0] || (nav === "tasks" && parts[0] === "task")
                                 || (nav === "agents" && parts[0] === "agent"));
  });
  const view = $("#view");
  view.replaceChildren();
  if (!token()) return login();
  page(view, parts.slice(1), params).catch((exc) => {
    if (exc instanceof ApiError && exc.status !== 401) {
      view.replaceChildren(h("div", { class: "panel" }, h("div", { class: "error-box" }, `${exc.code}: ${exc.message}`)));
    } else if (!(exc instanceof ApiError)) {
      console.error(exc);
    }
  });
}

function setQuery(params) {
  const [path] = location.hash.split("?");
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== false));
  history.replaceState(null, "", `${path}${q.toString() ? `?${q}` : ""}`);
}

function login(message) {
  generation += 1;
  timers.forEach(clearInterval);
  timers = [];
  const input = h("input", { type: "password", placeholder: "lbt_…", autocomplete: "off", "aria-label": "token" });
  const submit = async (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await whoami();
      if (!location.hash || location.hash === "#/login") location.hash = "#/tasks";
      else route();
    } catch (exc) { /* the page shows why */ }
  };
  $("#view").replaceChildren(h("div", { class: "panel login" },
    h("h1", {}, "Sign in"),
    h("p", { class: "sub" }, "The control center acts as the principal your token is bound to: the router checks and ",
      "audits what you do here exactly as if you ran agentctl."),
    message && token() ? h("div", { class: "error-box" }, message) : null,
    h("form", { onsubmit: submit },
      input,
      h("button", { type: "submit" }, "Sign in")),
    h("p", { class: "sub" }, "Make a token with ", h("code", {}, "agentctl keys token add NAME"),
      ", or open the sign-in link ", h("code", {}, "agentctl keys token add NAME --link"), " prints.")));
  $("#who").textContent = "";
  $("#logout").hidden = true;
  input.focus();
}

async function whoami() {
  const me = await api("/me");
  $("#who").textContent = me.principal;
  $("#logout").hidden = false;
  return me;
}

// ---- tasks ----------------------------------------------------------------------------

async function tasksPage(view, _, params) {
  const filters = {
    status: params.get("status") || "", skill: params.get("skill") || "", agent: params.get("agent") || "",
    submitted_by: params.get("submitted_by") || "", top_level: params.get("top_level") !== "false",
  };
  let extra = [];   // older pages loaded with "Load older"
  let next = null;
  const body = h("tbody");
  const summary = h("div", { class: "summary" });
  const more = h("div", { class: "more" });
  const field = (name, placeholder) => h("input", {
    value: filters[name], placeholder, "aria-label": name,
    onchange: (e) => { filters[name] = e.target.value.trim(); reload(); },
  });
  const status = h("select", { "aria-label": "status", onchange: (e) => { filters.status = e.target.value; reload(); } },
    h("option", { value: "" }, "any status"),
    STATUSES.map((st) => h("option", { value: st, selected: st === filters.status }, st.replaceAll("_", " "))));
  view.append(
    h("div", { class: "page-head" }, h("h1", {}, "Tasks"), h("span", { class: "sub" }, "live"), h("span", { class: "spacer" }),
      h("a", { class: "button", href: "#/submit" }, "New task")),
    h("div", { class: "filters" }, status, field("skill", "skill"), field("agent", "agent"),
      field("submitted_by", "submitted by (cli-alice)"),
      h("label", {}, h("input", { type: "checkbox", checked: filters.top_level,
        onchange: (e) => { filters.top_level = e.target.checked; reload(); } }), " top level only")),
    summary,
    h("div", { class: "panel flush" }, h("table", {},
      h("thead", {}, h("tr", {}, ["task", "skill / step", "status", "agent", "submitted", "by", "took", "tries"]
        .map((c) => h("th", { class: c === "tries" || c === "took" ? "num" : "" }, c)))),
      body), more));

  const query = (before, limit) => {
    const q = new URLSearchParams({ limit: String(limit), top_level: String(filters.top_level) });
    for (const k of ["status", "skill", "agent", "submitted_by"]) if (filters[k]) q.set(k, filters[k]);
    if (before) q.set("before", String(before));
    return `/tasks?${q}`;
  };
  const row = (t) => h("tr", { class: "clickable", onclick: (e) => { if (e.target.tagName !== "A") location.hash = `#/task/${t.task_id}`; } },
    h("td", {}, taskLink(t.task_id)),
    h("td", { class: "trunc" }, t.kind === "plan" ? h("span", { class: "chip" }, "plan") : null, " ", what(t),
      t.step && t.skill ? h("span", { class: "sub" }, ` · ${t.skill}`) : null),
    h("td", {}, badge(t.status), t.fraction !== null && t.status === "running" ? h("span", { class: "sub" }, ` ${Math.round(t.fraction * 100)}%`) : null),
    h("td", {}, t.agent || ""),
    h("td", {}, when(t.submitted_at)),
    h("td", { class: "sub" }, t.submitted_by),
    h("td", { class: "num" }, took(t)),
    h("td", { class: "num" }, t.attempts || ""));
  const render = (items) => {
    body.replaceChildren(...(items.length ? items.map(row)
      : [h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No tasks match. Submit one from the Submit page or with agentctl submit."))]));
    const counts = {};
    for (const t of items) counts[t.status] = (counts[t.status] || 0) + 1;
    summary.replaceChildren(...Object.entries(counts).map(([st, n]) => h("span", {
      class: `badge s-${st}`, title: `show only ${st}`,
      onclick: () => { filters.status = filters.status === st ? "" : st; status.value = filters.status; reload(); },
    }, `${n} ${st.replaceAll("_", " ")}`)));
    more.replaceChildren(next ? h("button", { class: "secondary", onclick: loadOlder }, "Load older") : "");
  };
  let first = [];
  const refresh = async () => {
    const page = await api(query(null, 50));
    first = page.items;
    if (!extra.length) next = page.next;
    render([...first, ...extra]);
  };
  const loadOlder = async () => {
    try {
      const page = await api(query(next, 50));
      extra = [...extra, ...page.items];
      next = page.next;
      render([...first, ...extra]);
    } catch (exc) { failed(exc); }
  };
  const reload = () => {
    setQuery({ ...filters, top_level: filters.top_level ? "" : "false" });
    extra = [];
    refresh().catch(failed);
  };
  await every(2000, refresh);
}

// ---- one task -------------------------------------------------------------------------

async function taskPage(view, [id]) {
  const gen = generation;
  const head = h("div", { class: "page-head" });
  const facts = h("div", { class: "panel" });
  const dag = h("div", { class: "panel", hidden: true });
  const steps = h("div", { class: "panel flush", hidden: true });
  const results = h("div", { class: "grid2" });
  const trace = h("div", { class: "panel flush" });
  const records = h("div", { class: "panel" });
  view.append(head, facts, dag, steps, results, trace, records);
  let task = null;
  let traced = 0;

  const refresh = async () => {
    const t = await api(`/tasks/${encodeURIComponent(id)}?history=true`);
    if (gen !== generation) return;
    const wasDone = task && TERMINAL.has(task.status);
    task = t;
    renderHead(t);
    renderFacts(t);
    renderTree(t);
    renderResults(t);
    renderRecords(t);
    // The trace while it grows, and for a few seconds after the end (every process sends
    // its spans in batches, a quarter of a second apart).
    const done = TERMINAL.has(t.status);
    if (!done || !wasDone || traced < TRACE_AFTER_END) {
      if (done) traced += 1;
      api(`/tasks/${encodeURIComponent(t.task_id)}/trace`).then((tr) => gen === generation && renderTrace(tr), () => {});
    }
  };

  const renderHead = (t) => {
    const actions = [];
    if (t.status === "awaiting_approval") {
      actions.push(h("button", { class: "good", onclick: () => act("Approve this task?", `${what(t)} (${t.task_id}) will run.`,
        (reason) => api(`/tasks/${t.task_id}/approve`, { method: "POST", body: { reason } }),
        (r) => `approved (audit seq ${r.seq})`, { okText: "Approve" }) }, "Approve"));
      actions.push(h("button", { class: "danger", onclick: () => act("Deny this task?", `${what(t)} (${t.task_id}) will not run.`,
        (reason) => api(`/tasks/${t.task_id}/deny`, { method: "POST", body: { reason } }),
        (r) => `denied (audit seq ${r.seq})`, { okText: "Deny", danger: true }) }, "Deny"));
    }
    if (!TERMINAL.has(t.status)) {
      actions.push(h("button", { class: "secondary", onclick: () => act("Cancel this task?",
        `${what(t)} (${t.task_id}) and everything under it will be cancelled.`,
        (reason) => api(`/tasks/${t.task_id}/cancel`, { method: "POST", body: { reason } }),
        (r) => `cancelled (audit seq ${r.seq})`, { okText: "Cancel task", danger: true }) }, "Cancel"));
    }
    head.replaceChildren(
      h("div", {}, h("h1", {}, t.kind === "plan" ? "Plan " : "", what(t), " ", badge(t.status)),
        h("div", { class: "sub id" }, t.task_id)),
      h("span", { class: "spacer" }), ...actions);
  };

  const renderFacts = (t) => {
    const rows = [
      ["kind", t.kind], ["skill", t.skill], ["agent", t.agent],
      ["submitted", t.submitted_at && h("span", {}, ago(t.submitted_at), h("span", { class: "sub" }, ` · seq ${t.submitted_seq}`))],
      ["by", t.submitted_by], ["took", took(t)], ["attempts", t.attempts ? `${t.attempts} (dispatched ${t.dispatches})` : ""],
      ["parent", t.parent_task_id && taskLink(t.parent_task_id, t.parent_task_id)],
      ["needs", t.needs && t.needs.length ? h("span", { class: "chips" }, t.needs.map((n) => h("span", { class: "chip" }, n))) : ""],
      ["priority", t.priority ?? ""], ["progress", t.progress ? `${t.progress}${t.fraction !== null ? ` (${Math.round(t.fraction * 100)}%)` : ""}` : ""],
      ["retry at", t.retry_at ? when(t.retry_at) : ""],
      ["usage", t.tokens ? `${t.tokens} tokens${t.cost_usd ? `, $${t.cost_usd.toFixed(4)}` : ""}` : ""],
      ["trace", t.trace_id ? h("span", { class: "id" }, t.trace_id) : ""],
    ].filter(([, v]) => v !== "" && v !== null && v !== undefined);
    facts.replaceChildren(h("dl", { class: "facts" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  };

  const renderTree = (t) => {
    const children = t.children || [];
    dag.hidden = !children.some((c) => c.step);
    steps.hidden = !children.length;
    if (!dag.hidden) {
      const done = children.filter((c) => c.status === "completed").length;
      dag.replaceChildren(h("h2", {}, "Steps", h("span", { class: "sub" }, `${done} of ${children.length} completed`)),
        drawDag(children.filter((c) => c.step).map((c) => ({
          id: c.step, deps: c.deps || [], status: c.status, title: c.step,
          meta: c.skill || (c.needs || []).join(", "), agent: c.agent, href: `#/task/${encodeURIComponent(c.task_id)}`,
        }))));
    }
    if (children.length) {
      steps.replaceChildren(h("table", {},
        h("thead", {}, h("tr", {}, ["step / subtask", "skill", "status", "agent", "took", "result"].map((c) => h("th", {}, c)))),
        h("tbody", {}, flatten(children).map(([c, depth]) => h("tr", {},
          h("td", { style: `padding-left:${12 + depth * 18}px` }, taskLink(c.task_id, c.step || short(c.task_id))),
          h("td", {}, c.skill || (c.needs || []).join(", ")),
          h("td", {}, badge(c.status)),
          h("td", {}, c.agent || ""),
          h("td", {}, took(c)),
          h("td", { class: "trunc mono", title: c.error || "" }, c.error ? h("span", { style: "color:var(--bad)" }, c.error)
            : c.output !== null && c.output !== undefined ? JSON.stringify(c.output) : ""))))));
    }
  };

  const renderResults = (t) => {
    const out = [];
    if (t.error) out.push(h("div", { class: "panel" }, h("h2", {}, "Error"), h("div", { class: "error-box" }, t.error)));
    if (t.output !== null && t.output !== undefined) out.push(h("div", { class: "panel" }, h("h2", {}, "Output"), h("pre", {}, json(t.output))));
    out.push(h("div", { class: "panel" }, h("h2", {}, "Input"), h("pre", {}, json(t.input))));
    results.replaceChildren(...out);
  };

  const renderRecords = (t) => {
    const history = t.history || [];
    records.replaceChildren(h("h2", {}, "Audit records", h("span", { class: "sub" }, `${history.length} · `,
      h("a", { href: `#/audit?key=${encodeURIComponent(t.task_id)}` }, "in the audit log"))),
      h("ul", { class: "timeline" }, history.map((r) => h("li", {},
        h("span", { class: "seq" }, `#${r.seq}`),
        h("span", {}, badge(r.verdict === "rejected" ? "rejected" : "accepted")),
        h("span", {}, h("b", {}, r.kind), " ", h("span", { class: "sub" }, `by ${r.principal} · ${new Date(r.at).toLocaleTimeString()}`),
          r.code !== "ok" ? h("span", { class: "sub" }, ` · ${r.code}${r.reason ? `: ${r.reason}` : ""}`) : null)))));
  };

  const renderTrace = (tr) => trace.replaceChildren(h("h2", { style: "padding:14px 16px 0" }, "Trace",
    h("span", { class: "sub id" }, tr.trace_id || "not traced")), waterfall(tr));

  await every(1000, async () => {
    if (task && TERMINAL.has(task.status) && traced >= TRACE_AFTER_END) return;
    await refresh();
  });
}

function flatten(children, depth = 0) {
  return children.flatMap((c) => [[c, depth], ...flatten(c.children || [], depth + 1)]);
}

/** A left-to-right layered drawing of steps: a step's column is the longest chain of
 * dependencies before it. */
function drawDag(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const layer = new Map();
  const depth = (n, seen = new Set()) => {
    if (layer.has(n.id)) return layer.get(n.id);
    if (seen.has(n.id)) return 0;
    seen.add(n.id);
    const d = Math.max(-1, ...n.deps.filter((d) => byId.has(d)).map((d) => depth(byId.get(d), seen))) + 1;
    layer.set(n.id, d);
    return d;
  };
  nodes.forEach((n) => depth(n));
  const columns = [];
  for (const n of nodes) (columns[layer.get(n.id)] ||= []).push(n);
  const W = 188, H = 58, GX = 64, GY = 18, PAD = 12;
  const pos = new Map();
  columns.forEach((col, x) => col.forEach((n, y) => pos.set(n.id, { x: PAD + x * (W + GX), y: PAD + y * (H + GY) })));
  const width = PAD * 2 + columns.length * W + (columns.length - 1) * GX;
  const height = PAD * 2 + Math.max(...columns.map((c) => c.length)) * (H + GY) - GY;
  const edges = nodes.flatMap((n) => n.deps.filter((d) => pos.has(d)).map((d) => {
    const a = pos.get(d), b = pos.get(n.id);
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    return s("path", { class: `edge${byId.get(d).status === "completed" ? " done" : ""}`,
                       d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 6},${y2}`, "marker-end": "url(#arrow)" });
  }));
  const boxes = nodes.map((n) => {
    const p = pos.get(n.id);
    const g = s("g", { class: `node n-${n.status}`, transform: `translate(${p.x},${p.y})`, "data-step": n.id,
                       "data-status": n.status, tabindex: 0, role: "link" },
      s("title", {}, `${n.title}: ${n.status}${n.agent ? ` on ${n.agent}` : ""}`),
      s("rect", { class: "box", width: W, height: H }),
      s("rect", { class: "stripe", width: 5, height: H }),
      s("text", { x: 14, y: 20, "font-weight": 600 }, clip(n.title, 24)),
      s("text", { x: 14, y: 36, class: "meta" }, clip(n.meta || "", 28)),
      s("text", { x: 14, y: 50, class: "meta" }, clip(`${n.status.replaceAll("_", " ")}${n.agent ? ` · ${n.agent}` : ""}`, 28)));
    if (n.href) {
      g.addEventListener("click", () => { location.hash = n.href; });
      g.addEventListener("keydown", (e) => { if (e.key === "Enter") location.hash = n.href; });
    }
    return g;
  });
  return h("div", { class: "dag" }, s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "plan graph" },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
      s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#9ca3af" }))),
    edges, boxes));
}

/** A time as people read it in a log: the local date and time to the second. */
function stamp(iso) {
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

const clip = (text, n) => text.length > n ? `${text.slice(0, n - 1)}…` : text;

/** The trace as a waterfall: one row per span, indented by depth, bars on one time axis. */
function waterfall(tr) {
  const spans = tr.spans || [];
  if (!spans.length) {
    return h("div", { class: "empty" }, tr.trace_id ? "No spans on TRACES yet (they arrive within a second)." : "This task has no trace.");
  }
  const start = Math.min(...spans.map((sp) => sp.start_ns));
  const end = Math.max(...spans.map((sp) => sp.end_ns));
  const total = Math.max(1, end - start);
  const colour = new Map((tr.services || []).map((sv, i) => [sv, SERVICE_COLOURS[i % SERVICE_COLOURS.length]]));
  return h("div", { class: "wf" },
    h("div", { class: "wf-legend" }, (tr.services || []).map((sv) => h("span", {}, h("i", { style: `background:${colour.get(sv)}` }), sv)),
      h("span", {}, `total ${seconds(total / 1e9)}`), h("span", {}, "outlined: critical path")),
    spans.map((sp) => h("div", { class: "wf-row", title: sp.status_message || Object.entries(sp.attributes || {}).map(([k, v]) => `${k}=${v}`).join("\n") },
      h("div", { class: "wf-name", style: `padding-left:${sp.depth * 14}px` }, sp.name, h("span", { class: "svc" }, sp.service)),
      h("div", { class: "wf-track" }, h("div", {
        class: `wf-bar${sp.critical ? " critical" : ""}${sp.failed ? " failed" : ""}`,
        style: `left:${((sp.start_ns - start) / total) * 100}%;width:${Math.max(0.3, ((sp.end_ns - sp.start_ns) / total) * 100)}%;background:${colour.get(sp.service)}`,
      })),
      h("div", { class: "wf-dur" }, seconds((sp.end_ns - sp.start_ns) / 1e9)))));
}

// ---- submit ---------------------------------------------------------------------------

const EXAMPLE_PLAN = `# A plan: steps run when their dependencies complete (docs/orchestration.md).
name: release notes
steps:
  - id: gather
    skill: echo
    input: {text: "collect merged changes"}
  - id: draft
    skill: sleep
    input: {seconds: 1}
    deps: [gather]
  - id: check
    skill: echo
    input: {text: "spell-check"}
    deps: [gather]
  - id: publish
    skill: echo
    input: {text: "publish"}
    deps: [draft, check]
`;

async function submitPage(view, _, params) {
  const mode = params.get("mode") === "plan" ? "plan" : "task";
  const tabs = h("div", { class: "tabs" },
    h("button", { class: mode === "task" ? "on" : "", onclick: () => { location.hash = "#/submit"; } }, "A task"),
    h("button", { class: mode === "plan" ? "on" : "", onclick: () => { location.hash = "#/submit?mode=plan"; } }, "A plan"));
  view.append(h("div", { class: "page-head" }, h("h1", {}, "Submit")), tabs);
  if (mode === "plan") return planForm(view);
  const [skills, agents] = await Promise.all([api("/skills"), api("/agents").catch(() => [])]);
  const live = new Set(agents.filter((a) => a.status === "online").flatMap((a) => a.skills));
  const pick = h("select", { id: "skill", "aria-label": "skill" },
    skills.map((sk) => h("option", { value: sk.name, selected: sk.name === params.get("skill") },
      `${sk.name}${live.has(sk.name) ? "" : "  (no live agent)"}`)));
  const fields = h("div", { class: "form" });
  const opts = {
    timeout: h("input", { type: "number", value: "300", min: "1", step: "any", "aria-label": "timeout" }),
    retries: h("input", { type: "number", value: "0", min: "0", max: "99", "aria-label": "retries" }),
  };
  const desc = h("p", { class: "sub" });
  let read = () => ({});
  const build = () => {
    const skill = skills.find((sk) => sk.name === pick.value);
    desc.textContent = skill ? `${skill.description}${skill.capabilities.length ? ` · capabilities: ${skill.capabilities.join(", ")}` : ""}` : "";
    const form = schemaForm(skill && skill.input);
    read = form.read;
    fields.replaceChildren(...form.rows,
      h("label", {}, "Timeout (s)"), opts.timeout, h("label", {}, "Retries", h("span", { class: "hint" }, "runs again after a failure")), opts.retries);
  };
  pick.addEventListener("change", build);
  const error = h("div");
  const send = async (e) => {
    e.preventDefault();
    error.replaceChildren();
    try {
      const input = read();
      const done = await api("/tasks", { method: "POST", body: {
        skill: pick.value, input, timeout_s: Number(opts.timeout.value), retries: Number(opts.retries.value) } });
      // Answered once the router has recorded it (a refusal is the error below); the code
      // says why an accepted task waits.
      toast(`submitted ${done.task_id}${done.code && done.code !== "ok" ? `: ${done.code}` : ""}`);
      location.hash = `#/task/${done.task_id}`;
    } catch (exc) {
      error.replaceChildren(h("div", { class: "error-box" }, exc.code ? `${exc.code}: ${exc.message}` : exc.message));
    }
  };
  build();
  view.append(h("form", { class: "panel", onsubmit: send },
    h("div", { class: "form" }, h("label", { for: "skill" }, "Skill"), pick),
    desc, fields, error, h("div", { class: "actions", style: "margin-top:14px" }, h("button", { type: "submit" }, "Submit task"))));
}

/** Form rows made from a skill's input JSON schema (msgspec's: a $ref into $defs), and a
 * reader that turns them back into the input object; no schema: one JSON field. */
function schemaForm(schema) {
  const root = schema && schema.$ref ? schema.$defs[schema.$ref.split("/").pop()] : schema;
  if (!root || root.type !== "object" || !root.properties) {
    const area = h("textarea", { "aria-label": "input", name: "input" }, "{}");
    return {
      rows: [h("label", {}, "Input", h("span", { class: "hint" }, "a JSON object: this skill takes any")), area],
      read: () => parseJson(area.value, "input"),
    };
  }
  const required = new Set(root.required || []);
  const readers = [];
  const rows = Object.entries(root.properties).flatMap(([name, prop]) => {
    const p = prop.$ref ? { ...schema.$defs[prop.$ref.split("/").pop()], default: prop.default } : prop;
    const type = Array.isArray(p.type) ? p.type.find((t) => t !== "null") : p.type;
    let el;
    let get;
    if (p.enum) {
      el = h("select", { name }, required.has(name) ? null : h("option", { value: "" }, "—"),
        p.enum.map((v) => h("option", { value: v, selected: v === p.default }, String(v))));
      get = () => el.value === "" ? undefined : el.value;
    } else if (type === "boolean") {
      el = h("input", { type: "checkbox", name, checked: p.default === true });
      get = () => el.checked;
    } else if (type === "integer" || type === "number") {
      el = h("input", { type: "number", name, step: type === "integer" ? "1" : "any", value: p.default ?? "",
                        min: p.minimum ?? null, max: p.maximum ?? null });
      get = () => el.value === "" ? undefined : Number(el.value);
    } else if (type === "array" && p.items && p.items.type === "string") {
      el = h("input", { type: "text", name, value: (p.default || []).join(", "), placeholder: "comma-separated" });
      get = () => el.value.trim() === "" ? (required.has(name) ? undefined : []) : el.value.split(",").map((x) => x.trim()).filter(Boolean);
    } else if (type === "string") {
      const long = !p.maxLength || p.maxLength > 200;
      el = long ? h("textarea", { name, style: "min-height:90px;font-family:inherit" }, p.default ?? "")
                : h("input", { type: "text", name, value: p.default ?? "" });
      get = () => el.value === "" && !required.has(name) ? undefined : el.value;
    } else {
      el = h("textarea", { name }, p.default !== undefined ? json(p.default) : "");
      get = () => el.value.trim() === "" ? undefined : parseJson(el.value, name);
    }
    readers.push([name, get]);
    return [h("label", { for: name }, name, required.has(name) ? " *" : "",
      h("span", { class: "hint" }, [p.description && p.description.split(/\.\s|\n/)[0], type && !p.enum ? type : null]
        .filter(Boolean).join(" · "))), el];
  });
  return {
    rows,
    read: () => {
      const out = {};
      for (const [name, get] of readers) {
        const v = get();
        if (v !== undefined) out[name] = v;
        else if (required.has(name)) throw new ApiError(0, "invalid_request", `${name} is required`);
      }
      return out;
    },
  };
}

function parseJson(text, name) {
  try {
    return JSON.parse(text);
  } catch (exc) {
    throw new ApiError(0, "invalid_request", `${name}: not valid JSON: ${exc.message}`);
  }
}

function planForm(view) {
  const area = h("textarea", { "aria-label": "plan", id: "plan-text", style: "min-height:340px" }, EXAMPLE_PLAN);
  const file = h("input", { type: "file", accept: ".yaml,.yml,.json", "aria-label": "plan file",
    onchange: async (e) => { if (e.target.files[0]) { area.value = await e.target.files[0].text(); check(); } } });
  const preview = h("div");
  let checked = null;
  const submit = h("button", { type: "button", disabled: true, onclick: async () => {
    try {
      const done = await api("/plans", { method: "POST", body: checked });
      toast(`submitted plan ${done.task_id}${done.code && done.code !== "ok" ? `: ${done.code}` : ""}`);
      location.hash = `#/task/${done.task_id}`;
    } catch (exc) {
      preview.replaceChildren(h("div", { class: "error-box" }, `${exc.code}: ${exc.message}`));
    }
  } }, "Submit plan");
  const check = async () => {
    checked = null;
    submit.disabled = true;
    try {
      checked = await api("/plans/check", { method: "POST", body: { text: area.value } });
      submit.disabled = false;
      preview.replaceChildren(h("h2", {}, "Preview", h("span", { class: "sub" }, `${checked.steps.length} steps`)),
        drawDag(checked.steps.map((st) => ({ id: st.id, deps: st.deps || [], status: "waiting", title: st.id,
                                             meta: st.skill || (st.capabilities || []).join(", ") }))));
    } catch (exc) {
      preview.replaceChildren(h("div", { class: "error-box" }, `${exc.code}: ${exc.message}`));
    }
  };
  area.addEventListener("input", () => { submit.disabled = true; });
  view.append(
    h("div", { class: "panel" }, h("h2", {}, "Plan file", h("span", { class: "sub" }, "YAML or JSON, as for agentctl submit --plan")), area,
      h("div", { class: "actions", style: "margin-top:10px;align-items:center" },
        h("button", { type: "button", class: "secondary", onclick: check }, "Check"), submit, file)),
    h("div", { class: "panel" }, preview));
  check();
}

// ---- agents ---------------------------------------------------------------------------

async function agentsPage(view) {
  const body = h("tbody");
  view.append(h("div", { class: "page-head" }, h("h1", {}, "Agents"), h("span", { class: "sub" }, "live")),
    h("div", { class: "panel flush" }, h("table", {},
      h("thead", {}, h("tr", {}, ["agent", "status", "skills", "replicas", "load", "heartbeat", "done", "failed", "joined"]
        .map((c) => h("th", { class: ["replicas", "done", "failed"].includes(c) ? "num" : "" }, c)))), body)));
  await every(2000, async () => {
    const agents = await api("/agents");
    agents.sort((a, b) => (a.status === b.status ? a.name.localeCompare(b.name) : a.status === "online" ? -1 : 1));
    body.replaceChildren(...(agents.length ? agents.map((a) => {
      const capacity = Math.max(1, a.concurrency * Math.max(1, a.replicas || 0));
      return h("tr", { class: "clickable", onclick: () => { location.hash = `#/agent/${a.name}`; } },
        h("td", {}, h("a", { href: `#/agent/${encodeURIComponent(a.name)}` }, a.name), a.role ? h("div", { class: "sub" }, typeof a.role === "string" ? a.role : a.role.name || "") : null),
        h("td", {}, badge(a.status)),
        h("td", {}, h("span", { class: "chips" }, a.skills.map((sk) => h("span", { class: "chip" }, sk)))),
        h("td", { class: "num" }, a.replicas ?? ""),
        h("td", {}, h("span", { class: "bar", title: `${a.load || 0} running of ${capacity}` },
          h("span", { style: `width:${Math.min(100, ((a.load || 0) / capacity) * 100)}%` })), h("span", { class: "sub" }, ` ${a.load || 0}/${capacity}`)),
        h("td", {}, a.last_heartbeat ? when(a.last_heartbeat) : h("span", { class: "sub" }, "none")),
        h("td", { class: "num" }, a.tasks_completed),
        h("td", { class: "num" }, a.tasks_failed),
        h("td", {}, when(a.joined_at)));
    }) : [h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No agent has joined yet: start one with agentctl agent."))]));
  });
}

async function agentPage(view, [name]) {
  const gen = generation;
  const head = h("div", { class: "page-head" });
  const memory = h("div", { class: "grid2" });
  const checkpoints = h("div", { class: "panel flush" });
  view.append(head, memory, checkpoints);
  const enc = encodeURIComponent(name);
  head.append(h("div", {}, h("h1", {}, name), h("div", { class: "sub" }, "memory and checkpoints")), h("span", { class: "spacer" }),
    h("button", { class: "secondary", onclick: async () => {
      const label = await confirmAction("Save a checkpoint?", `The memory of ${name} as it is now; you can restore it later.`,
                                        { okText: "Save checkpoint", field: "Label (optional)" });
      if (label === null) return;
      try {
        const r = await api(`/agents/${enc}/checkpoints`, { method: "POST", body: { label } });
        toast(`saved checkpoint ${r.event.checkpoint_id} (audit seq ${r.seq})`);
        refreshNow();
      } catch (exc) { failed(exc); }
    } }, "Save checkpoint"),
    h("button", { class: "danger", onclick: () => act(`Wipe the memory of ${name}?`,
      "Its current task, observations, reasoning and non-core knowledge are cleared. Its role and core knowledge stay. "
      + "Save a checkpoint first to be able to go back.",
      (reason) => api(`/agents/${enc}/memory/wipe`, { method: "POST", body: { reason } }),
      (r) => `wiped (audit seq ${r.seq})`, { okText: "Wipe memory", danger: true }) }, "Wipe memory"));

  await every(3000, async () => {
    const [m, cps] = await Promise.all([api(`/agents/${enc}/memory`), api(`/agents/${enc}/checkpoints`)]);
    if (gen !== generation) return;
    const list = (title, entries) => h("div", { class: "panel" }, h("h2", {}, title, h("span", { class: "sub" }, String(entries.length))),
      entries.length ? h("ul", { class: "timeline" }, entries.slice(-20).reverse().map((e) => h("li", { style: "grid-template-columns:90px 1fr" },
        h("span", { class: "sub" }, e.at ? ago(e.at) : ""),
        e.rolled ? h("span", { class: "sub" }, `${e.rolled} older entries, summarised (from seq ${e.first_seq})`)
          : h("span", { class: "mono" }, typeof e.value === "string" ? e.value : JSON.stringify(e.value)))))
        : h("div", { class: "empty" }, "empty"));
    const knowledge = Object.entries(m.knowledge || {});
    memory.replaceChildren(
      h("div", { class: "panel" }, h("h2", {}, "Memory"), h("dl", { class: "facts" },
        h("dt", {}, "role"), h("dd", {}, m.role ? JSON.stringify(m.role) : h("span", { class: "sub" }, "none")),
        h("dt", {}, "current task"), h("dd", {}, m.current_task ? taskLink(m.current_task.task_id || m.current_task, null) : h("span", { class: "sub" }, "none")),
        h("dt", {}, "wiped at"), h("dd", {}, m.wiped_seq ? `seq ${m.wiped_seq}` : "never"),
        h("dt", {}, "restored from"), h("dd", {}, m.restored_from || "—")),
        h("h3", { style: "margin-top:14px" }, "Knowledge"),
        knowledge.length ? h("table", { class: "kv" }, h("tbody", {}, knowledge.map(([k, v]) => h("tr", {}, h("td", {}, k),
          h("td", { class: "mono" }, JSON.stringify(v.value)),
          h("td", {}, v.core ? h("span", { class: "chip", title: "core knowledge: a wipe keeps it" }, "core") : null))))) : h("div", { class: "sub" }, "none")),
      list("Observations", m.observations || []),
      list("Reasoning", m.reasoning || []));
    checkpoints.replaceChildren(h("h2", { style: "padding:14px 16px 0" }, "Checkpoints"), cps.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["checkpoint", "label", "saved", "by", "seq", "knowledge", "entries", "restored", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, cps.slice().reverse().map((c) => h("tr", {},
        h("td", { class: "id" }, c.checkpoint_id), h("td", {}, c.label), h("td", {}, when(c.at)), h("td", { class: "sub" }, c.saved_by),
        h("td", {}, c.seq), h("td", {}, c.knowledge), h("td", {}, c.entries), h("td", {}, c.restores ? `${c.restores}×` : ""),
        h("td", {}, h("button", { class: "small secondary", onclick: () => act(`Restore ${name} to ${c.checkpoint_id}?`,
          `Its memory becomes what it was at seq ${c.seq}${c.label ? ` (${c.label})` : ""}. What it learned since is replaced.`,
          () => api(`/agents/${enc}/checkpoints/${encodeURIComponent(c.checkpoint_id)}/restore`, { method: "POST" }),
          (r) => `restored (audit seq ${r.seq})`, { okText: "Restore", danger: true, reason: false }) }, "Restore"))))))
      : h("div", { class: "empty" }, "No checkpoints yet."));
  });
}

// ---- approvals ------------------------------------------------------------------------

async function approvalsPage(view, _, params) {
  const all = params.get("all") === "true";
  const body = h("tbody");
  view.append(h("div", { class: "page-head" }, h("h1", {}, "Approvals"),
    h("span", { class: "sub" }, "tasks of dangerous skills wait here for an approver (policy.toml [approval])"),
    h("span", { class: "spacer" }),
    h("label", {}, h("input", { type: "checkbox", checked: all, onchange: (e) => { location.hash = e.target.checked ? "#/approvals?all=true" : "#/approvals"; } }), " decided ones too")),
    h("div", { class: "panel flush" }, h("table", {}, h("thead", {}, h("tr", {},
      ["task", "skill", "submitted by", "held since", "decision", "reason", ""].map((c) => h("th", {}, c)))), body)));
  await every(2000, async () => {
    const rows = await api(`/approvals?all=${all}`);
    body.replaceChildren(...(rows.length ? rows.map((r) => h("tr", { "data-task": r.task_id },
      h("td", {}, taskLink(r.task_id)),
      h("td", {}, r.skill),
      h("td", {}, r.submitted_by),
      h("td", {}, when(r.requested_at)),
      h("td", {}, r.status !== "pending" ? h("span", {}, badge(r.status), h("span", { class: "sub" }, ` by ${r.decided_by || "?"} `), when(r.decided_at))
        : badge("awaiting_approval")),
      h("td", { class: "sub trunc" }, r.reason || ""),
      h("td", { class: "actions" }, r.status !== "pending" ? null : [
        h("button", { class: "small good", onclick: () => act("Approve this task?", `${r.skill} (${r.task_id}) will run.`,
          (reason) => api(`/tasks/${r.task_id}/approve`, { method: "POST", body: { reason } }), (x) => `approved (audit seq ${x.seq})`,
          { okText: "Approve" }) }, "Approve"),
        h("button", { class: "small danger", onclick: () => act("Deny this task?", `${r.skill} (${r.task_id}) will not run.`,
          (reason) => api(`/tasks/${r.task_id}/deny`, { method: "POST", body: { reason } }), (x) => `denied (audit seq ${x.seq})`,
          { okText: "Deny", danger: true }) }, "Deny")])))
      : [h("tr", {}, h("td", { colspan: 7, class: "empty" }, "Nothing waits for approval."))]));
  });
}

async function pollApprovals() {
  if (!token()) return;
  try {
    const rows = await api("/approvals");
    const el = $("#approvals-count");
    el.hidden = !rows.length;
    el.textContent = String(rows.length);
  } catch (exc) { /* shown by the page */ }
}

// ---- audit ----------------------------------------------------------------------------

async function auditPage(view, _, params) {
  const filters = { kind: params.get("kind") || "", verdict: params.get("verdict") || "", principal: params.get("principal") || "",
                    key: params.get("key") || "" };
  const body = h("tbody");
  const more = h("div", { class: "more" });
  const verify = h("div", { class: "panel" });
  let oldest = null;
  let rows = [];
  const field = (name, placeholder) => h("input", { value: filters[name], placeholder, "aria-label": name,
    onchange: (e) => { filters[name] = e.target.value.trim(); reload(); } });
  const verdict = h("select", { "aria-label": "verdict", onchange: (e) => { filters.verdict = e.target.value; reload(); } },
    ["", "accepted", "rejected"].map((v) => h("option", { value: v, selected: v === filters.verdict }, v || "any verdict")));
  view.append(h("div", { class: "page-head" }, h("h1", {}, "Audit log"),
    h("span", { class: "sub" }, "append-only, hash-chained, signed; newest first"), h("span", { class: "spacer" })),
    verify,
    h("div", { class: "filters" }, field("kind", "kind (task_completed)"), verdict, field("principal", "principal (agent-echo-1)"),
      field("key", "task id or agent")),
    h("div", { class: "panel flush" }, h("table", {}, h("thead", {}, h("tr", {},
      ["seq", "at", "verdict", "kind", "principal", "key", "code"].map((c) => h("th", {}, c)))), body), more));

  const runVerify = async () => {
    verify.replaceChildren(h("h2", {}, "Chain verification"), h("div", { class: "sub" }, "verifying every record from seq 1…"));
    try {
      const v = await api("/audit/verify");
      verify.replaceChildren(h("h2", {}, "Chain verification ", badge(v.ok ? "ok" : "bad"),
        h("span", { class: "sub" }, v.ok ? `intact: ${v.head.seq} records, head ${v.head.hash.slice(0, 16)}…`
          : `first bad seq ${v.first_bad_seq ?? "?"}: ${v.problem}`), h("span", { class: "spacer", style: "flex:1" }),
        h("button", { class: "small secondary", onclick: runVerify }, "Verify again")),
        h("table", { class: "kv" }, h("tbody", {}, v.checks.map((c) => h("tr", {}, h("td", {}, c.check),
          h("td", {}, badge(c.ok ? "ok" : "bad")), h("td", { class: "sub" }, c.detail))))));
    } catch (exc) {
      verify.replaceChildren(h("h2", {}, "Chain verification"), h("div", { class: "error-box" }, `${exc.code}: ${exc.message}`));
    }
  };
  verify.append(h("h2", {}, "Chain verification", h("span", { class: "spacer", style: "flex:1" }),
    h("button", { class: "small", onclick: runVerify }, "Verify the chain")),
    h("div", { class: "sub" }, "Recompute every hash and signature from the first record, compare the anchors and the projections with a rebuild."));

  const query = (before) => {
    const q = new URLSearchParams({ order: "desc", limit: "100" });
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    if (before) q.set("before", String(before));
    return `/audit?${q}`;
  };
  const row = (r) => {
    const detail = h("tr", { hidden: true }, h("td", { colspan: 7 }, h("pre", {}, json(r))));
    const main = h("tr", { class: "clickable", onclick: () => { detail.hidden = !detail.hidden; } },
      h("td", { class: "id" }, r.seq), h("td", { class: "sub", title: r.at, style: "white-space:nowrap" }, stamp(r.at)),
      h("td", {}, badge(r.verdict)), h("td", {}, r.kind), h("td", {}, r.principal),
      h("td", {}, /^[A-Za-z0-9_-]{20,}/.test(r.key) ? taskLink(r.key) : r.key),
      h("td", { class: "sub trunc", title: r.reason }, r.code === "ok" ? "" : `${r.code}${r.reason ? `: ${r.reason}` : ""}`));
    return [main, detail];
  };
  const render = () => {
    body.replaceChildren(...(rows.length ? rows.flatMap(row)
      : [h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No records match."))]));
    more.replaceChildren(oldest && oldest > 1 ? h("button", { class: "secondary", onclick: older }, "Older records") : "");
  };
  const older = async () => {
    try {
      const page = await api(query(oldest));
      rows = [...rows, ...page];
      oldest = page.length === 100 ? page[page.length - 1].seq : null;
      render();
    } catch (exc) { failed(exc); }
  };
  const refresh = async () => {
    const page = await api(query(null));
    const seen = rows.length ? rows[0].seq : 0;
    if (!rows.length || page.length && page[0].seq !== seen) {
      const fresh = page.filter((r) => r.seq > seen);
      rows = rows.length ? [...fresh, ...rows] : page;
      if (oldest === null && page.length === 100) oldest = page[page.length - 1].seq;
      render();
    }
  };
  const reload = () => {
    setQuery(filters);
    rows = [];
    oldest = null;
    refresh().catch(failed);
  };
  await every(3000, refresh);
}

// ---- start ----------------------------------------------------------------------------

window.addEventListener("hashchange", route);
$("#logout").addEventListener("click", () => {
  localStorage.removeItem(TOKEN_KEY);
  login();
});
setInterval(pollApprovals, 5000);
if (token()) whoami().then(pollApprovals, () => {});
route();
