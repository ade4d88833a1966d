// peerd web view. Hand-written, no framework, no build step.
//
// Data: GET /status, /peers, /ledger (every 2 s) and /v1/plans (when this peer has
// it), plus the /events stream (Server-Sent Events, read with fetch so that every
// event type arrives, whatever its name). The page authenticates with the cookie
// that /ui?token=T set; it only ever reads. Every string from the daemon goes into
// the page as text, never as markup.
"use strict";

const POLL_MS = 2000;
const PLANS_RETRY_MS = 30000; // how often to ask again for /v1/plans after a 404
const RECONNECT_MS = 2000;
const KEEP_PLANS = 30, KEEP_TASKS = 30, KEEP_ROUTES = 30, KEEP_EVENTS = 300;

const state = {
  status: null, peers: [], ledger: [], startedAt: null,
  plans: new Map(),      // plan id -> plan (from plan.* events and /v1/plans records)
  plansApi: "unknown",   // "unknown" | "present" | "absent"
  plansCheckedAt: 0,
  tasks: new Map(),      // task id -> task (from task.* events and /v1/tasks/{id})
  routes: [],            // recent inference.completed events, newest first
  events: [],            // recent events, newest first
  lastId: 0, live: false, authLost: false,
};

// ---- small helpers -------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);
const short = (id) => (id ? String(id).slice(-8) : "");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function names() {
  const out = new Map();
  for (const e of state.ledger) if (e.name) out.set(e.peer_id, e.name);
  if (state.status) out.set(state.status.peer_id, state.status.name);
  return out;
}

function peer(id) {
  if (!id) return h("span", { class: "meta" }, "-");
  const name = names().get(id);
  return h("span", { class: "peer", title: id, "data-peer": id },
    name ? name : "", name ? " " : "", h("span", { class: "id" }, short(id)));
}

function ago(ts) {
  if (!ts) return "-";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

const ms = (v) => (v === null || v === undefined ? "-" : `${Number(v).toFixed(1)} ms`);
const secs = (v) => (v === null || v === undefined ? "-" : `${Number(v).toFixed(2)} s`);
const range = (a, b) => `[${a}, ${b})`;

function bytes(n) {
  if (!n) return "";
  const g = n / 2 ** 30;
  return g >= 1 ? `${g.toFixed(1)} GiB` : `${(n / 2 ** 20).toFixed(0)} MiB`;
}

function clip(text, n) {
  const s = typeof text === "string" ? text : JSON.stringify(text);
  return s && s.length > n ? s.slice(0, n - 1) + "…" : s || "";
}

function table(headers, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map(([t, cls]) => h("th", { class: cls }, t)))),
    h("tbody", {}, rows));
}

// ---- reading the daemon ----------------------------------------------------------

async function getJSON(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store",
                                headers: { Accept: "application/json" } });
  if (r.status === 401) {
    state.authLost = true;
    throw new Error("unauthorized");
  }
  return { status: r.status, body: r.ok ? await r.json() : null };
}

async function poll() {
  for (;;) {
    try {
      const [s, p, l] = await Promise.all([getJSON("/status"), getJSON("/peers"),
                                           getJSON("/ledger")]);
      if (s.body) {
        const startedAt = Date.now() / 1000 - s.body.uptime_s;
        if (state.startedAt !== null && Math.abs(startedAt - state.startedAt) > 5) {
          state.lastId = 0; // the daemon restarted: its event ids start again
        }
        state.startedAt = startedAt;
        state.status = s.body;
      }
      if (p.body) state.peers = p.body;
      if (l.body) state.ledger = l.body;
      await pollPlans();
      state.authLost = false;
    } catch (e) {
      // shown by the header; the next round tries again
    }
    render();
    await sleep(POLL_MS);
  }
}

async function pollPlans() {
  const now = Date.now();
  if (state.plansApi === "absent" && now - state.plansCheckedAt < PLANS_RETRY_MS) return;
  state.plansCheckedAt = now;
  const r = await getJSON("/v1/plans");
  if (r.status === 404 || r.status === 405) {
    state.plansApi = "absent";
    return;
  }
  if (!r.body) return;
  state.plansApi = "present";
  const rows = Array.isArray(r.body) ? r.body : r.body.plans || r.body.data || [];
  for (const row of rows.slice(0, KEEP_PLANS)) {
    const known = state.plans.get(row.id);
    if (!known || (known.status !== row.status && !known.live)) {
      await loadPlan(row.id);
    }
  }
}

async function loadPlan(id) {
  try {
    const r = await getJSON(`/v1/plans/${encodeURIComponent(id)}`);
    if (r.body) mergePlanRecord(r.body);
  } catch (e) { /* next round */ }
}

// ---- the event stream ------------------------------------------------------------

async function follow() {
  for (;;) {
    try {
      const r = await fetch("/events?replay=256", { credentials: "same-origin",
                                                    cache: "no-store" });
      if (r.status === 401) state.authLost = true;
      if (r.ok && r.body) {
        setLive(true);
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            onBlock(block);
          }
        }
      }
    } catch (e) { /* reconnect below */ }
    setLive(false);
    await sleep(RECONNECT_MS);
  }
}

function onBlock(block) {
  const data = block.split("\n").filter((l) => l.startsWith("data:"))
    .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
  if (!data) return;
  let ev;
  try { ev = JSON.parse(data); } catch (e) { return; }
  if (ev.id) {
    if (ev.id <= state.lastId) return; // a replayed event we already have
    state.lastId = ev.id;
  }
  onEvent(ev);
  render();
}

function onEvent(ev) {
  state.events.unshift(ev);
  state.events.length = Math.min(state.events.length, KEEP_EVENTS);
  const t = ev.type || "";
  if (t.startsWith("plan.")) onPlanEvent(ev);
  else if (t.startsWith("task.")) onTaskEvent(ev);
  else if (t === "inference.completed") {
    state.routes.unshift(ev);
    state.routes.length = Math.min(state.routes.length, KEEP_ROUTES);
  }
}

function setLive(on) {
  state.live = on;
  render();
}

// ---- plans: a record per plan, built from plan.* events (the contract's) ----------

function newPlan(id) {
  return { id, goal: "", mode: "", status: "running", created: null, finished: null,
           budget: null, used: null, steps: new Map(), answer: null, reason: null,
           live: false };
}

function planStep(plan, n) {
  if (!plan.steps.has(n)) {
    plan.steps.set(n, { step: n, thought: null, tokens: null, elapsed_s: null,
                        calls: new Map(), replans: [] });
  }
  return plan.steps.get(n);
}

function planCall(step, id) {
  if (!step.calls.has(id)) {
    step.calls.set(id, { call_id: id, tool: "", arguments: null, peer: null, ok: null,
                         code: null, elapsed_s: null, attempts: null, observation: null,
                         retries: [] });
  }
  return step.calls.get(id);
}

function onPlanEvent(ev) {
  if (!ev.plan) return;
  let plan = state.plans.get(ev.plan);
  if (!plan) {
    plan = newPlan(ev.plan);
    state.plans.set(ev.plan, plan);
    if (ev.type !== "plan.created" && state.plansApi === "present") loadPlan(ev.plan);
  }
  plan.live = true;
  const kind = ev.type.slice(5);
  const atStep = !["created", "answer", "failed"].includes(kind);
  const step = atStep ? planStep(plan, ev.step || 0) : null;
  switch (kind) {
    case "created":
      Object.assign(plan, { goal: ev.goal || "", mode: ev.mode || "", budget: ev.budget,
                            created: ev.ts });
      break;
    case "thought":
      Object.assign(step, { thought: ev.text, tokens: ev.tokens, elapsed_s: ev.elapsed_s });
      break;
    case "call": {
      const c = planCall(step, ev.call_id);
      Object.assign(c, { tool: ev.tool, arguments: ev.arguments });
      break;
    }
    case "retry": {
      const c = planCall(step, ev.call_id);
      c.tool = c.tool || ev.tool;
      c.retries.push({ peer: ev.peer, attempt: ev.attempt, reason: ev.reason });
      break;
    }
    case "result": {
      const c = planCall(step, ev.call_id);
      for (const k of ["tool", "peer", "ok", "code", "elapsed_s", "attempts", "observation"]) {
        if (ev[k] !== undefined) c[k] = ev[k];
      }
      break;
    }
    case "replan":
      step.replans.push(ev.reason);
      break;
    case "answer":
      Object.assign(plan, { answer: ev.text, status: "answered", finished: ev.ts });
      break;
    case "failed":
      Object.assign(plan, { reason: ev.reason, status: "failed", finished: ev.ts });
      break;
  }
  trim(state.plans, KEEP_PLANS);
}

const given = (v) => v !== null && v !== undefined && v !== "";
const ended = (status) => status === "answered" || status === "failed";

// A record read over the API may have left the daemon before events the stream has
// already shown (its reply can come last): it fills in what the page lacks and never
// takes back a plan's end or a call's result.
function mergePlanRecord(rec) {
  const plan = state.plans.get(rec.id) || newPlan(rec.id);
  const planEnded = ended(plan.status);
  for (const k of ["goal", "mode", "status", "created", "finished", "budget", "used",
                   "answer", "reason"]) {
    if (planEnded && k === "status") continue;
    if (given(rec[k])) plan[k] = rec[k];
  }
  for (const s of rec.steps || []) {
    const step = planStep(plan, s.step);
    if (s.thought) step.thought = s.thought;
    for (const c of s.calls || []) {
      const call = planCall(step, c.call_id);
      if (given(call.ok) && !given(c.ok)) continue; // its result is already here
      for (const [k, v] of Object.entries(c)) if (given(v)) call[k] = v;
    }
  }
  state.plans.set(rec.id, plan);
  trim(state.plans, KEEP_PLANS);
  render();
}

function trim(map, keep) {
  while (map.size > keep) map.delete(map.keys().next().value);
}

// ---- Symphony tasks, from task.* events (and GET /v1/tasks/{id} once done) --------

function onTaskEvent(ev) {
  const id = ev.task_id;
  if (!id) return;
  let task = state.tasks.get(id);
  if (!task) {
    task = { id, role: "requester", status: "running", requirement: "", workers: null,
             bids: [], elected: [], seats: new Map(), votes: [], fallbacks: [],
             answer: null, total_ms: null, requester: null, ts: ev.ts };
    state.tasks.set(id, task);
    trim(state.tasks, KEEP_TASKS);
  }
  switch (ev.type) {
    case "task.beacon":
      Object.assign(task, { requirement: ev.requirement, workers: ev.workers,
                            format: ev.answer_format });
      break;
    case "task.bid":
      task.bids.push({ peer_id: ev.peer_id, match: ev.match, load: ev.load });
      break;
    case "task.elected":
      task.elected = ev.elected || [];
      task.beacon_ms = ev.beacon_ms;
      break;
    case "task.assigned":
      task.seats.set(ev.seat, { peer_id: ev.peer_id, temperature: ev.temperature });
      break;
    case "task.answer":
      task.votes.push({ seat: ev.seat, peer_id: ev.peer_id, answer: ev.answer,
                        confidence: ev.confidence, elapsed_s: ev.elapsed_s, weight: null });
      break;
    case "task.fallback":
      task.fallbacks.push({ seat: ev.seat, peer_id: ev.peer_id, reason: ev.reason });
      break;
    case "task.done":
      Object.assign(task, { status: ev.status, answer: ev.answer, total_ms: ev.total_ms });
      loadTask(id);
      break;
    case "task.bid_sent": case "task.solving": case "task.solved": case "task.seat_wait":
      task.role = "worker";
      task.requester = ev.requester || task.requester;
      if (ev.type === "task.solved") {
        Object.assign(task, { status: "solved", answer: ev.answer, elapsed_s: ev.elapsed_s });
      } else if (ev.type === "task.bid_sent") {
        task.status = ev.accepted ? "bid accepted" : `bid refused (${ev.reason || "?"})`;
      } else if (ev.type === "task.solving") task.status = "solving";
      break;
  }
}

async function loadTask(id) {
  try {
    const r = await getJSON(`/v1/tasks/${encodeURIComponent(id)}`);
    const task = state.tasks.get(id);
    if (!r.body || !task) return;
    if (Array.isArray(r.body.votes)) {
      task.votes = r.body.votes.map((v) => ({ ...v }));
    }
    if (r.body.answer !== undefined) task.answer = r.body.answer;
    if (r.body.status) task.status = r.body.status;
    render();
  } catch (e) { /* the events are enough */ }
}

// ---- the swarm: peers, their shards, and the gaps in each model's coverage -------

function swarmRows() {
  const connected = new Map(state.peers.map((p) => [p.peer_id, p]));
  const rows = [];
  const own = state.status ? state.status.peer_id : null;
  const seen = new Set();
  for (const e of state.ledger) {
    seen.add(e.peer_id);
    rows.push({ id: e.peer_id, entry: e, conn: connected.get(e.peer_id), self: e.peer_id === own });
  }
  for (const p of state.peers) {
    if (!seen.has(p.peer_id)) rows.push({ id: p.peer_id, entry: null, conn: p, self: false });
  }
  if (own && !seen.has(own)) rows.unshift({ id: own, entry: null, conn: null, self: true });
  rows.sort((a, b) => (b.self - a.self) || label(a).localeCompare(label(b)));
  return rows;
}

function label(row) {
  return (row.entry && row.entry.name) || (row.self && state.status && state.status.name) || row.id;
}

function reach(row) {
  const addrs = (row.entry && row.entry.addrs) || (row.conn && row.conn.addrs) || [];
  if (!addrs.length) return "";
  const relayed = addrs.filter((a) => a.includes("/p2p-circuit"));
  if (relayed.length === addrs.length) return "relayed";
  return relayed.length ? "direct + relay" : "direct";
}

// Per model: its layer count, who serves which range, and the runs no peer serves.
function coverage() {
  const models = new Map();
  for (const e of state.ledger) {
    for (const m of e.models || []) {
      if (!models.has(m.model_id)) models.set(m.model_id, { id: m.model_id, layers: 0, spans: [] });
      const model = models.get(m.model_id);
      model.layers = Math.max(model.layers, m.num_layers || 0);
      model.spans.push({ peer: e.peer_id, start: m.layer_start, end: m.layer_end,
                         tps: m.tokens_per_s, dtype: m.dtype });
    }
  }
  for (const model of models.values()) {
    model.known = model.layers > 0;
    const n = Math.min(4096, model.known ? model.layers
                                         : Math.max(0, ...model.spans.map((s) => s.end)));
    model.n = n;
    model.count = new Array(n).fill(0);
    for (const s of model.spans) {
      for (let i = Math.max(0, s.start); i < Math.min(n, s.end); i++) model.count[i] += 1;
    }
    model.gaps = [];
    for (let i = 0; i < n; i++) {
      if (model.count[i] !== 0) continue;
      const start = i;
      while (i < n && model.count[i] === 0) i++;
      model.gaps.push([start, i]);
    }
    model.spans.sort((a, b) => a.start - b.start || a.end - b.end);
  }
  return [...models.values()].sort((a, b) => a.id.localeCompare(b.id));
}

// ---- rendering -------------------------------------------------------------------

let renderQueued = false;
function render() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => {
    renderQueued = false;
    renderHeader();
    renderSwarm();
    renderLedger();
    renderPlans();
    renderTasks();
    renderRoutes();
    renderEvents();
  }, 50);
}

function replace(id, ...children) {
  $(id).replaceChildren(...children.flat());
}

function renderHeader() {
  const s = state.status;
  if (s) {
    replace("self", `${s.name} `, h("span", { class: "id", title: s.peer_id }, short(s.peer_id)),
      ` · v${s.version} · up ${Math.round(s.uptime_s)} s · ${s.peers} connected` +
      (s.ledger_size !== undefined ? ` · ${s.ledger_size} in ledger` : ""));
  }
  const live = $("live");
  live.className = "live " + (state.live ? "on" : "off");
  live.textContent = state.live ? "live" : "reconnecting";
  const notice = $("notice");
  notice.hidden = !state.authLost;
  notice.textContent = state.authLost
    ? "the daemon refused this page's cookie: run `peerd ui --open` again" : "";
}

function renderSwarm() {
  const rows = swarmRows();
  $("swarm-count").textContent = `${rows.length} peers`;
  const body = rows.map((r) => {
    const e = r.entry || {};
    const hw = e.hardware || {};
    const load = e.load || {};
    const state_ = r.self ? ["this peer", "ok"] : r.conn ? ["connected", "ok"]
                                                           : ["not connected", "warn"];
    const rtt = r.conn && r.conn.rtt_ms !== null && r.conn.rtt_ms !== undefined
      ? r.conn.rtt_ms.toFixed(1) : "-";
    return h("tr", { "data-peer": r.id, class: "peer-row" },
      h("td", {}, (e.name || (r.self && state.status ? state.status.name : "")) || h("span", { class: "meta" }, "(no entry)")),
      h("td", { class: "id", title: r.id }, short(r.id)),
      h("td", { class: `state ${state_[1]}` }, state_[0]),
      h("td", {}, reach(r)),
      h("td", { class: "num" }, rtt),
      h("td", {}, [hw.accelerator || hw.device || "", hw.memory_bytes ? ` ${bytes(hw.memory_bytes)}` : ""].join("")),
      h("td", { class: "num" }, r.entry ? `${load.sessions || 0}/${load.queue || 0}` : "-"),
      h("td", {}, (e.models || []).map((m) =>
        h("span", { class: "chip shard", title: `${m.dtype || ""} ${m.tokens_per_s ? m.tokens_per_s.toFixed(1) + " tok/s" : ""}` },
          `${m.model_id} ${range(m.layer_start, m.layer_end)}`))),
      h("td", { class: "num" }, r.conn ? String(r.conn.offences || 0) : "-"));
  });
  replace("peers", table([["name"], ["id"], ["state"], ["reach"], ["RTT ms", "num"],
                          ["hardware"], ["sessions/queue", "num"], ["shards (layers)"],
                          ["offences", "num"]], body, { id: "peer-table" }));
  const models = coverage();
  if (!models.length) {
    replace("coverage", h("p", { class: "empty" }, "no peer in the ledger serves a model"));
    return;
  }
  replace("coverage", models.map((m) => {
    const cells = m.count.map((c, i) => h("span", {
      class: `c${Math.min(c, 3)}`, title: `layer ${i}: ${c} peer${c === 1 ? "" : "s"}` }));
    const redundancy = m.count.length ? Math.min(...m.count) : 0;
    return h("div", { class: "model", "data-model": m.id },
      h("div", {}, h("b", {}, m.id), ` · ${m.known ? m.n : "≥ " + m.n} layers · `,
        `${m.spans.length} shard${m.spans.length === 1 ? "" : "s"}`,
        m.known ? "" : h("span", { class: "meta" }, " (the layer count is not advertised)")),
      h("div", { class: "bar" }, cells),
      h("div", { class: "spans" }, m.spans.map((s) =>
        h("span", { class: "chip" }, peer(s.peer), ` ${range(s.start, s.end)}`))),
      m.gaps.length
        ? h("div", { class: "gaps" }, "gaps: ", m.gaps.map(([a, b]) =>
            h("span", { class: "gap", "data-gap": `${a}-${b}` }, `layers ${range(a, b)} `)),
            h("span", { class: "meta" }, "no peer serves them: requests for this model fail"))
        : h("div", { class: "ok covered" },
            `every layer served (at least ${redundancy} peer${redundancy === 1 ? "" : "s"} each)`));
  }));
}

function renderLedger() {
  const entries = [...state.ledger].sort((a, b) => (a.name || a.peer_id).localeCompare(b.name || b.peer_id));
  $("ledger-count").textContent = `${entries.length} entries`;
  const body = entries.map((e) => h("tr", { "data-peer": e.peer_id },
    h("td", {}, peer(e.peer_id)),
    h("td", { class: "num" }, String(e.seq)),
    h("td", {}, ago(e.timestamp)),
    h("td", { class: "num" }, e.expires_in_s !== undefined ? `${Math.round(e.expires_in_s)} s` : "-"),
    h("td", {}, (e.models || []).map((m) => h("span", { class: "chip" },
      `${m.model_id} ${range(m.layer_start, m.layer_end)}${m.num_layers ? "/" + m.num_layers : ""}`))),
    h("td", {}, (e.tools || []).map((t) => h("span", { class: "chip", title: `schema ${t.schema}` },
      `${t.name} ×${t.capacity}`))),
    h("td", {}, (e.skills || []).map((s) => h("span", { class: "chip" }, clip(s, 40)))),
    h("td", {}, e.software || ""),
    h("td", {}, (e.features || []).join(", "))));
  replace("ledger-table", entries.length
    ? table([["peer"], ["seq", "num"], ["signed"], ["expires in", "num"], ["models"],
             ["tools (capacity)"], ["capabilities"], ["software"], ["features"]], body)
    : h("p", { class: "empty" }, "the ledger is empty"));
}

function renderPlans() {
  const note = $("plans-note");
  note.hidden = state.plansApi !== "absent";
  note.textContent = "this peer has no plans API (/v1/plans answered 404): plans show here " +
    "as their plan.* events arrive";
  const plans = [...state.plans.values()].reverse();
  $("plans-count").textContent = plans.length ? `${plans.length}` : "";
  if (!plans.length) {
    replace("plan-list", h("p", { class: "empty" }, "no plans yet"));
    return;
  }
  replace("plan-list", plans.map(renderPlan));
}

function renderPlan(p) {
  const cls = p.status === "answered" ? "ok" : p.status === "failed" ? "bad" : "run";
  const steps = [...p.steps.values()].sort((a, b) => a.step - b.step);
  const calls = steps.reduce((n, s) => n + s.calls.size, 0);
  const b = p.budget || {};
  return h("div", { class: "plan", "data-plan": p.id, "data-status": p.status },
    h("div", { class: "plan-head" },
      h("span", { class: `state ${cls}` }, p.status), " ",
      h("b", {}, p.goal || "(goal not seen)"), " ",
      h("span", { class: "meta" },
        `${p.id} · ${p.mode || "?"} · ${steps.length} steps` +
        (b.steps ? `/${b.steps}` : "") + ` · ${calls} calls` + (b.calls ? `/${b.calls}` : "") +
        ` · ${p.finished && p.created ? secs(p.finished - p.created) : ago(p.created)}`)),
    h("ol", { class: "steps" }, steps.map((s) => h("li", { class: "step", "data-step": s.step, value: s.step },
      s.thought !== null ? h("div", { class: "thought" }, s.thought,
        h("span", { class: "meta" }, s.elapsed_s ? ` (${secs(s.elapsed_s)}${s.tokens ? `, ${s.tokens} tokens` : ""})` : "")) : null,
      s.calls.size ? h("ul", { class: "calls" }, [...s.calls.values()].map(renderCall)) : null,
      s.replans.map((r) => h("div", { class: "replan" }, `replan: ${r}`))))),
    p.answer !== null && p.answer !== undefined ? h("div", { class: "answer" }, `answer: ${p.answer}`) : null,
    p.status === "failed" ? h("div", { class: "failed-reason" }, `failed: ${p.reason || "?"}`) : null);
}

function renderCall(c) {
  const outcome = c.ok === null || c.ok === undefined ? ["running", "run"]
    : c.ok ? ["ok", "ok"] : [c.code || "failed", "bad"];
  return h("li", { class: "call", "data-call": c.call_id, "data-outcome": outcome[0] },
    h("code", {}, `${c.tool}(${clip(c.arguments || {}, 120)})`), " → ",
    c.peer ? peer(c.peer) : h("span", { class: "meta" }, "…"), " ",
    h("span", { class: `state ${outcome[1]}` }, outcome[0]),
    h("span", { class: "meta" }, c.elapsed_s !== null && c.elapsed_s !== undefined ? ` ${secs(c.elapsed_s)}` : "",
      c.attempts > 1 ? ` · ${c.attempts} attempts` : ""),
    c.retries.map((r) => h("div", { class: "retry" }, `retry: attempt ${r.attempt} after `,
      peer(r.peer), ` failed: ${r.reason}`)),
    c.observation ? h("div", { class: "obs" }, clip(c.observation, 500)) : null);
}

function renderTasks() {
  const tasks = [...state.tasks.values()].reverse();
  $("tasks-count").textContent = tasks.length ? `${tasks.length}` : "";
  if (!tasks.length) {
    replace("task-list", h("p", { class: "empty" }, "no tasks yet"));
    return;
  }
  replace("task-list", tasks.map((t) => {
    const cls = t.status === "done" || t.status === "solved" ? "ok"
      : t.status === "running" || t.status === "solving" ? "run" : "warn";
    const votes = t.votes.length ? table([["peer"], ["answer"], ["confidence", "num"], ["weight", "num"], ["time", "num"]],
      t.votes.map((v) => h("tr", {}, h("td", {}, peer(v.peer_id)), h("td", {}, clip(v.answer, 80)),
        h("td", { class: "num" }, v.confidence !== undefined && v.confidence !== null ? Number(v.confidence).toFixed(2) : "-"),
        h("td", { class: "num" }, v.weight !== undefined && v.weight !== null ? Number(v.weight).toFixed(3) : "-"),
        h("td", { class: "num" }, v.elapsed_s !== undefined ? secs(v.elapsed_s) : "-")))) : null;
    return h("div", { class: "task", "data-task": t.id },
      h("div", {}, h("span", { class: `state ${cls}` }, t.status), " ",
        h("b", {}, clip(t.requirement || "", 120) || t.id), " ",
        h("span", { class: "meta" }, `${t.id} · ${t.role}` +
          (t.role === "worker" ? "" : ` · ${t.bids.length} bids · elected ${t.elected.length}` +
            (t.workers ? `/${t.workers}` : "")) +
          (t.total_ms ? ` · ${ms(t.total_ms)}` : "")),
        t.role === "worker" ? h("span", {}, " for ", peer(t.requester)) : null),
      t.fallbacks.map((f) => h("div", { class: "retry" }, `seat ${f.seat}: `, peer(f.peer_id), ` ${f.reason}`)),
      votes,
      t.answer !== null && t.answer !== undefined ? h("div", { class: "answer" }, `answer: ${clip(t.answer, 200)}`) : null);
  }));
}

function renderRoutes() {
  $("routes-count").textContent = state.routes.length ? `${state.routes.length}` : "";
  if (!state.routes.length) {
    replace("routes", h("p", { class: "empty" },
      "no inference request finished since this page's history began"));
    return;
  }
  replace("routes", table([["when"], ["model"], ["route (peer [layers))"], ["tokens", "num"],
                           ["tok/s", "num"], ["wall", "num"], ["pipeline / compute / head", "num"]],
    state.routes.map((r) => h("tr", { class: "inference" },
      h("td", {}, ago(r.ts)),
      h("td", {}, r.model || ""),
      h("td", {}, h("div", { class: "route" }, (r.route || []).flatMap((hop, i) => [
        i ? h("span", { class: "arrow" }, "→") : null,
        h("span", { class: "chip hop" }, peer(hop.peer_id), ` ${range(hop.layers[0], hop.layers[1])}`)]),
        r.reroutes ? h("span", { class: "warn" }, ` ${r.reroutes} reroutes`) : null)),
      h("td", { class: "num" }, `${r.prompt_tokens}+${r.completion_tokens}`),
      h("td", { class: "num" }, r.tokens_per_s !== undefined ? Number(r.tokens_per_s).toFixed(1) : "-"),
      h("td", { class: "num" }, ms(r.wall_ms)),
      h("td", { class: "num" }, `${ms(r.pipeline_ms)} / ${ms(r.compute_ms)} / ${ms(r.head_ms)}`)))));
}

function renderEvents() {
  const filter = $("event-filter").value.trim();
  const shown = state.events.filter((e) => !filter || (e.type || "").includes(filter)).slice(0, 200);
  replace("event-log", shown.map((e) => {
    const { id, type, ts, ...rest } = e;
    const when = ts ? new Date(ts * 1000).toLocaleTimeString() : "";
    return h("div", { title: JSON.stringify(e) }, `${when} `, h("b", {}, type), ` ${clip(rest, 300)}`);
  }));
}

$("event-filter").addEventListener("input", render);
poll();
follow();
