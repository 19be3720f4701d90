// The operators' dashboard: figures pushed by the gateway once a second over SSE
// (/api/dashboard/events; the page never polls), drawn over the last minutes; admin
// controls once an admin token is given (sent as a Bearer header to /api/admin/*, kept in
// this tab's sessionStorage, never in the URL).
import { draw } from "/static/chart.js";

const SPAN_S = 300; // what the charts show
const KEEP_S = 600;
const $ = (id) => document.getElementById(id);
const tokens = window.sessionStorage;
let history = []; // snapshots, oldest first
let latest = null;

const fmt = (v, digits = 0) => (v == null || !Number.isFinite(v) ? "–" : Number(v).toFixed(digits));
const CARDS = [
  { id: "ttft_p50", label: "TTFT p50", unit: "ms", get: (s) => s.ttft_ms?.p50 },
  { id: "ttft_p95", label: "TTFT p95", unit: "ms", get: (s) => s.ttft_ms?.p95, threshold: (t) => t.ttft_p95_ms },
  { id: "queue_p95", label: "Queue wait p95", unit: "ms", get: (s) => s.queue_wait_ms?.p95, threshold: (t) => t.queue_wait_p95_ms },
  { id: "error_rate", label: "Error rate", unit: "%", digits: 1, get: (s) => (s.error_rate == null ? null : s.error_rate * 100), threshold: (t) => (t.error_rate == null ? null : t.error_rate * 100) },
  { id: "coalesce", label: "Coalescing (followers per leader)", unit: "", digits: 1, get: (s) => s.coalesce?.ratio, threshold: (t) => t.coalesce_min_ratio, extra: (s) => (s.coalesce ? `${s.coalesce.followers} / ${s.coalesce.leaders}` : "") },
  { id: "active", label: "Active streams", unit: "", get: (s) => s.active_streams },
  { id: "upstream", label: "Upstream calls/s", unit: "", digits: 1, get: (s) => s.upstream_calls_per_s },
];

function buildCards() {
  const box = $("cards");
  $("span-min").textContent = String(SPAN_S / 60);
  for (const card of CARDS) {
    const el = document.createElement("article");
    el.className = "card";
    el.id = `card-${card.id}`;
    const h = document.createElement("h3");
    h.textContent = card.label;
    const value = document.createElement("p");
    value.className = "value";
    value.textContent = "–";
    const extra = document.createElement("p");
    extra.className = "extra";
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `${card.label} over the last ${SPAN_S / 60} minutes`);
    el.append(h, value, extra, svg);
    box.append(el);
    card.el = { value, extra, svg };
  }
}

function render() {
  if (!latest) return;
  const thresholds = latest.alerts?.thresholds || {};
  const to = latest.at;
  for (const card of CARDS) {
    const v = card.get(latest);
    card.el.value.textContent = v == null ? "–" : `${fmt(v, card.digits || 0)}${card.unit ? " " + card.unit : ""}`;
    card.el.value.dataset.value = v == null ? "" : String(v);
    card.el.extra.textContent = card.extra ? card.extra(latest) : "";
    const points = history.map((s) => [s.at, card.get(s) ?? null]);
    // less than the span sampled yet (the sampler runs while someone watches): what there is
    const from = Math.max(to - SPAN_S, history.length ? history[0].at : to - SPAN_S);
    draw(card.el.svg, points, { from, to, threshold: card.threshold ? card.threshold(thresholds) : null });
  }
  renderAlerts(latest.alerts);
  renderPacers(latest.pacers || {});
  const problems = (latest.errors || []).join("; ");
  $("feed-state").textContent = `live · ${new Date(latest.at * 1000).toLocaleTimeString()}` +
    (latest.draining ? " · DRAINING" : "") + (problems ? ` · ${problems}` : "");
  fillThresholds(thresholds);
  fillPacerChoices(latest.pacers || {});
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.append(td);
  return td;
}

function renderAlerts(alerts) {
  const body = $("alerts").tBodies[0];
  body.replaceChildren();
  for (const rule of alerts?.rules || []) {
    const tr = document.createElement("tr");
    tr.dataset.rule = rule.name;
    tr.dataset.state = rule.state;
    cell(tr, rule.name);
    cell(tr, rule.state, `state state-${rule.state}`);
    cell(tr, rule.value == null ? "–" : fmt(rule.value, rule.value < 1 ? 3 : 0));
    cell(tr, `${rule.threshold_key} = ${rule.threshold ?? "–"}`);
    cell(tr, rule.for_s == null ? "–" : `${rule.for_s} s`);
    body.append(tr);
  }
}

function renderPacers(pacers) {
  const body = $("pacers").tBodies[0];
  body.replaceChildren();
  for (const [account, p] of Object.entries(pacers)) {
    const s = p.settings || {};
    const tr = document.createElement("tr");
    tr.dataset.account = account;
    cell(tr, account);
    cell(tr, `${fmt(p.tokens, 1)} / ${s.burst ?? "–"}`);
    cell(tr, `${p.queue_depth ?? "–"} / ${s.max_queue ?? "–"}`);
    cell(tr, `${p.in_flight ?? "–"} / ${s.concurrency ?? "–"}`);
    cell(tr, `${s.rps ?? "–"}`);
    cell(tr, `${s.rpm ?? "–"}`);
    body.append(tr);
  }
}

// --- the feed ------------------------------------------------------------------------------
function connect() {
  const source = new EventSource("/api/dashboard/events");
  source.addEventListener("message", (ev) => {
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (data.type === "history") {
      // the kept samples come in several frames: the first replaces, the rest append
      history = data.append ? history.concat(data.snapshots || []) : data.snapshots || [];
    } else if (data.type === "snapshot") {
      history.push(data.snapshot);
    } else if (data.type === "error") {
      $("feed-state").textContent = `feed ended: ${data.message}`;
      return;
    }
    if (!history.length) return;
    latest = history[history.length - 1];
    history = history.filter((s) => s.at >= latest.at - KEEP_S);
    render();
    document.body.dataset.snapshots = String(history.length);
    document.body.dataset.lastAt = String(latest.at);
  });
  source.addEventListener("error", () => {
    $("feed-state").textContent = "feed interrupted — reconnecting…";
  });
}

// --- admin ---------------------------------------------------------------------------------
function adminHeaders() {
  return { "content-type": "application/json", authorization: `Bearer ${tokens.getItem("sluice.adminToken") || ""}` };
}

async function admin(method, path, body) {
  const response = await fetch(path, { method, headers: adminHeaders(), body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try {
    data = await response.json();
  } catch { /* no body */ }
  if (!response.ok) {
    let message = data?.error?.message || `HTTP ${response.status}`;
    if (response.status === 404 && path === "/api/admin/state?role=coalescer") message = "admin is off on this gateway (SLUICE_ADMIN_TOKEN is not set)";
    throw new Error(message);
  }
  return data;
}

function result(text, ok = true) {
  const el = $("admin-result");
  el.textContent = text;
  el.dataset.ok = ok ? "1" : "0";
}

async function unlock() {
  try {
    const state = await admin("GET", "/api/admin/state?role=coalescer");
    const shard = Object.values(state.results || {})[0] || {};
    const flags = shard.flags || {};
    for (const box of $("flags-form").querySelectorAll("input[type=checkbox]")) box.checked = Boolean(flags[box.name]);
    $("admin-controls").hidden = false;
    thresholdsFilled = false;
    pacerFilled = "";
    render();
    result("Admin controls enabled.");
  } catch (err) {
    $("admin-controls").hidden = true;
    result(`Admin refused: ${err.message}`, false);
  }
}

let thresholdsFilled = false;
function fillThresholds(thresholds) {
  if (thresholdsFilled || $("admin-controls").hidden || !Object.keys(thresholds).length) return;
  const box = $("threshold-fields");
  box.replaceChildren();
  for (const [key, value] of Object.entries(thresholds)) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.name = key;
    input.value = String(value);
    input.inputMode = "decimal";
    label.append(`${key} `, input);
    box.append(label);
  }
  thresholdsFilled = true;
}

let pacerFilled = "";
function fillPacerChoices(pacers) {
  const select = $("pacer-account");
  const names = Object.keys(pacers);
  if (select.options.length !== names.length) {
    select.replaceChildren(...names.map((n) => new Option(n, n)));
  }
  const account = select.value;
  if (account && account !== pacerFilled && !$("admin-controls").hidden) {
    const s = pacers[account]?.settings || {};
    const form = $("pacer-form");
    for (const key of ["rps", "burst", "concurrency", "rpm"]) form.elements[key].value = s[key] == null ? "" : String(s[key]);
    pacerFilled = account;
  }
}

function numbers(form, names) {
  const out = {};
  for (const name of names) {
    const raw = form.elements[name].value.trim();
    if (raw !== "") out[name] = Number(raw);
  }
  return out;
}

async function apply(label, method, path, body) {
  try {
    await admin(method, path, body);
    result(`${label}: applied.`);
  } catch (err) {
    result(`${label}: ${err.message}`, false);
  }
}

function wireAdmin() {
  const input = $("admin-token");
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    tokens.setItem("sluice.adminToken", token);
    unlock();
  });
  $("token-clear").addEventListener("click", () => {
    tokens.removeItem("sluice.adminToken");
    input.value = "";
    $("admin-controls").hidden = true;
    result("Admin token forgotten.");
  });
  $("pacer-account").addEventListener("change", () => {
    pacerFilled = "";
    render();
  });
  $("pacer-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const form = e.currentTarget;
    const account = form.elements.account.value;
    apply(`pacer ${account}`, "POST", `/api/admin/pacer/${encodeURIComponent(account)}`, numbers(form, ["rps", "burst", "concurrency", "rpm"]));
  });
  $("flags-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const flags = {};
    for (const box of e.currentTarget.querySelectorAll("input[type=checkbox]")) flags[box.name] = box.checked;
    apply("flags", "POST", "/api/admin/flags", flags);
  });
  $("drain-on").addEventListener("click", () => apply("drain on", "POST", "/api/admin/drain", { on: true }));
  $("drain-off").addEventListener("click", () => apply("drain off", "POST", "/api/admin/drain", { on: false }));
  $("thresholds-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const names = [...e.currentTarget.querySelectorAll("#threshold-fields input")].map((i) => i.name);
    apply("thresholds", "POST", "/api/admin/alerts/thresholds", numbers(e.currentTarget, names));
  });
  if (tokens.getItem("sluice.adminToken")) {
    input.value = tokens.getItem("sluice.adminToken");
    unlock();
  }
}

buildCards();
wireAdmin();
connect();
