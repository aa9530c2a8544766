// The operator's page: the API's own endpoints, live from its event stream (no polling: the
// lists are read again when an event says a download started or ended, and after a reconnect).
// Every text from the API or the Hub goes into the page as text (textContent), never as HTML.
"use strict";

const KEY = "models-api-key";
const $ = (id) => document.getElementById(id);
const PAGE = 50; // cached revisions asked at a time
const state = {
  models: [],               // GET /list: the cached revisions shown (pages of the search)
  modelsTotal: 0,           // how many match the search
  nextCursor: null,         // the next page of the search, when there is one
  largest: [],              // GET /list?sort=size: the largest revisions, for the disk picture
  downloads: new Map(),     // task id -> status (from /downloads, kept live by events)
  updates: new Map(),       // "repo@ref" -> UpdateInfo
  problems: [],             // [{time, text}]
  historyLoaded: false,     // the failures of the history were put among the problems once
  lastEventId: null,
  nodes: [],                // in a fleet: GET /space's nodes (none on one machine)
  unanswered: [],           // in a fleet: the nodes the last list could not ask, and why
  space: null,              // GET /space
  throughput: null,         // GET /throughput: bytes per second over the last 10 minutes
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// -- the API -------------------------------------------------------------------------------

function words(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        const where = (d.loc || []).filter((p) => p !== "body").join(".");
        return where ? `${where}: ${d.msg}` : d.msg;
      })
      .join("\n");
  }
  return JSON.stringify(detail);
}

function headers(extra) {
  const all = { ...extra };
  const key = sessionStorage.getItem(KEY);
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function api(method, path, body, retried = false) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (response.status === 401 && !retried && (await askKey())) return api(method, path, body, true);
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const text = data && data.detail !== undefined ? words(data.detail) : `HTTP ${response.status}`;
    throw new ApiError(response.status, text);
  }
  return data;
}

let keyAsked = null;
function askKey() {
  // One dialog for every request that needs the key at once.
  if (keyAsked) return keyAsked;
  keyAsked = new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key").value = "";
    dialog.addEventListener(
      "close",
      () => {
        const key = $("key").value.trim();
        keyAsked = null;
        if (dialog.returnValue === "ok" && key) {
          sessionStorage.setItem(KEY, key);
          resolve(true);
        } else {
          resolve(false);
        }
      },
      { once: true },
    );
    dialog.showModal();
  });
  return keyAsked;
}

// -- words and numbers ---------------------------------------------------------------------

function size(n) {
  if (n === null || n === undefined) return "-";
  let value = n;
  for (const unit of ["B", "KB", "MB", "GB", "TB"]) {
    if (value < 1000 || unit === "TB") return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1000;
  }
  return `${n} B`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function selectionWords(selection) {
  if (!selection || !selection.length) return "";
  return selection
    .map((s) => {
      const parts = [];
      if (s.files) parts.push(s.files);
      if (s.allow_patterns && s.allow_patterns.length) parts.push(`+ ${s.allow_patterns.join(", ")}`);
      if (s.ignore_patterns && s.ignore_patterns.length) parts.push(`- ${s.ignore_patterns.join(", ")}`);
      return parts.join(" ");
    })
    .join("; ");
}

function modelName(model) {
  return model.hf_commit ? `${model.hf_repo} @ ${model.hf_commit}` : model.hf_repo;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// kind: "bad" (a failure), "warn" (something to decide), "info" (done). An action, when the API
// offers one for what it refused (a forced prune), is a button of the alert.
function alertUser(text, kind = "bad", action = null) {
  const close = el("button", { type: "button", "aria-label": "dismiss" }, "x");
  const classes = { bad: "alert", warn: "alert warn", info: "alert info" };
  const box = el("div", { class: classes[kind] || "alert", role: kind === "info" ? "status" : "alert" }, el("span", {}, text));
  if (action) {
    box.append(
      el("button", { type: "button", class: "danger", onclick: () => { box.remove(); action.run(); } }, action.label),
    );
  }
  box.append(close);
  close.addEventListener("click", () => box.remove());
  $("alerts").append(box);
}

function problem(text) {
  state.problems.unshift({ time: new Date(), text });
  state.problems.length = Math.min(state.problems.length, 50);
  renderProblems();
}

// -- reading the state ---------------------------------------------------------------------

// The cached revisions of the search (repo id contains, sort), as many as are shown now (at least
// a page): a page of the list, never all of it (a cache may hold ten thousand models).
function modelsQuery(limit, cursor) {
  const q = $("search").value.trim();
  const params = new URLSearchParams({ limit: String(limit), sort: $("sort").value });
  for (const s of ["DOWNLOADED", "PARTIAL", "NOT_FOUND"]) params.append("status", s);
  if (q) params.set("q", q);
  if (cursor) params.set("cursor", cursor);
  return `/api/models/list?${params}`;
}

function showModels(listed, more) {
  state.models = more ? [...state.models, ...listed.models] : listed.models;
  state.modelsTotal = listed.total ?? state.models.length;
  state.nextCursor = listed.next_cursor || null;
  state.unanswered = [...(listed.nodes_unanswered || [])];
  renderModels();
}

async function loadModels() {
  try {
    showModels(await api("GET", modelsQuery(Math.max(PAGE, state.models.length))), false);
  } catch (error) {
    alertUser(`Could not read the service: ${error.message}`);
  }
}

async function moreModels() {
  if (!state.nextCursor) return;
  try {
    showModels(await api("GET", modelsQuery(PAGE, state.nextCursor)), true);
  } catch (error) {
    alertUser(`Could not read the service: ${error.message}`);
  }
}

let searchTimer = null;
function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    state.models = []; // a new search starts at its first page
    loadModels();
  }, 200);
}

async function refresh() {
  // Asked at once; the models drawn as soon as their page comes, not after the disk's figures
  // (GET /space adds up the whole cache: seconds at 10,000 models).
  const listing = api("GET", modelsQuery(Math.max(PAGE, state.models.length)));
  const rest = Promise.all([
    api("GET", "/api/models/space"),
    api("GET", "/api/models/downloads"),
    api("GET", "/api/models/list?sort=size&limit=100&status=DOWNLOADED&status=PARTIAL"),
  ]);
  rest.catch(() => {}); // its failure is said below, once
  try {
    showModels(await listing, false);
    const [space, downloads, largest] = await rest;
    state.largest = largest.models;
    state.downloads = new Map(downloads.downloads.map((d) => [taskId(d.model), withNodes(d)]));
    state.nodes = space.nodes || [];
    state.space = space;
    state.unanswered.push(...(downloads.nodes_unanswered || []));
    renderDisk(space);
    renderFleet();
    renderUsage();
    renderDownloads();
  } catch (error) {
    alertUser(`Could not read the service: ${error.message}`);
  }
  loadHistory();
  loadThroughput();
}

// The throughput (GET /throughput), read every 2 s while something downloads or the chart still
// shows a transfer of the last 10 minutes; otherwise not at all.
async function loadThroughput() {
  try {
    state.throughput = await api("GET", "/api/models/throughput");
  } catch (_) {
    return; // an older service: no chart
  }
  renderThroughput();
  renderDownloads();
}

function throughputLive() {
  const t = state.throughput;
  return state.downloads.size > 0 || (t && t.service.some((v) => v > 0));
}

// The history (GET /history): what happened, kept by the service across reloads and restarts.
// At the page's first load, its failures are shown among the failures too.
async function loadHistory() {
  let answer;
  try {
    answer = await api("GET", "/api/models/history?limit=50");
  } catch (_) {
    return; // an older service without a history: the section stays empty
  }
  const entries = answer.entries || [];
  if (!state.historyLoaded) {
    state.historyLoaded = true;
    const failed = entries.filter((e) => e.event === "failed");
    state.problems.push(...failed.map((e) => ({ time: new Date(e.time * 1000), text: `${modelName(e.model)}: ${e.detail}` })));
    renderProblems();
  }
  $("no-history").hidden = entries.length > 0;
  $("history").hidden = entries.length === 0;
  $("history").tBodies[0].replaceChildren(...entries.map(historyRow));
}

function historyRow(e) {
  const when = new Date(e.time * 1000);
  return el(
    "tr",
    { class: e.event },
    el("td", {}, el("time", { datetime: when.toISOString() }, when.toLocaleString())),
    el("td", {}, e.event),
    el("td", {}, modelName(e.model) + (e.node_id ? ` (node ${nodeName(e.node_id)})` : "")),
    el("td", {}, e.size_bytes == null ? "" : size(e.size_bytes)),
    el("td", {}, e.duration_seconds == null ? "" : `${e.duration_seconds.toFixed(1)} s`),
    el("td", {}, e.by || ""),
    el("td", { class: "detail" }, e.detail || ""),
  );
}

let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, 150);
}

// In a fleet, a download's nodes by node id: {status, progress}, from /downloads and
// then from each node's events.
function withNodes(d) {
  if (d.nodes) d.byNode = new Map(d.nodes.map((n) => [n.node_id, n]));
  return d;
}

function nodeName(id) {
  return id ? id.slice(0, 12) : "";
}

function taskId(model) {
  return `${model.hf_repo}:${model.hf_commit || "latest"}`;
}

// The event stream, read with fetch (EventSource cannot send the API key); reconnects after a
// pause, asking for the events it missed (Last-Event-ID).
async function stream() {
  for (;;) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (state.lastEventId) extra["Last-Event-ID"] = state.lastEventId;
      const response = await fetch("/api/models/events", { headers: headers(extra) });
      if (response.status === 401) {
        connection(false, "the event stream needs an API key");
        if (!(await askKey())) await sleep(5000);
        continue;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      connection(true);
      refresh(); // what changed while the stream was down
      await readEvents(response.body);
    } catch (_) {
      // the service went away, or the network: try again
    }
    connection(false, "reconnecting...");
    await sleep(2000);
  }
}

async function readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (event.data !== undefined) onEvent(event);
        event = {};
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        event[field] = field === "data" && event.data !== undefined ? `${event.data}\n${text}` : text;
      }
    }
  }
}

function onEvent(raw) {
  if (raw.id) state.lastEventId = raw.id;
  let event;
  try {
    event = JSON.parse(raw.data);
  } catch (_) {
    return;
  }
  if (event.type === "evicted") {
    // Not a download: a cached revision removed to keep the cache within its budget.
    const where = event.node_id ? ` (node ${nodeName(event.node_id)})` : "";
    alertUser(`Evicted ${modelName(event.model)}${where}, ${size(event.freed_bytes)} freed: ${event.reason}`, "info");
    refreshSoon();
    return;
  }
  const id = event.task_id;
  const ended = ["completed", "failed", "cancelled"].includes(event.type);
  const node = event.node_id; // in a fleet: the node that sent it
  const known = state.downloads.get(id);
  if (ended) {
    // In a fleet, the download goes on while another node still runs it.
    if (node && known && known.byNode) known.byNode.delete(node);
    if (!node || !known || !known.byNode || known.byNode.size === 0) state.downloads.delete(id);
    const where = node ? ` (node ${nodeName(node)})` : "";
    if (event.type === "failed") problem(`${modelName(event.model)}${where}: ${event.error_message}`);
    refreshSoon();
  } else {
    const live = known || { model: event.model, status: "DOWNLOADING" };
    if (node) {
      live.byNode = live.byNode || new Map();
      live.byNode.set(node, { node_id: node, status: "DOWNLOADING", progress: event.progress });
    } else live.progress = event.progress;
    if (event.commit) live.commit = event.commit;
    state.downloads.set(id, live);
    if (event.type === "started" || event.type === "queued") refreshSoon();
  }
  renderDownloads();
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function connection(up, text) {
  const node = $("connection");
  node.textContent = up ? "Live" : `Not connected: ${text}`;
  node.classList.toggle("down", !up);
}

// -- pictures: SVG drawn here (no chart library, nothing from a CDN) ----------------------

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) if (child) node.append(child);
  return node;
}

function tip(text) {
  const title = document.createElementNS(SVG_NS, "title");
  title.textContent = text; // as text, never markup
  return title;
}

// An area chart of a series of rates (oldest first), scaled to its own peak.
function rateChart(series, label, height) {
  const width = 600;
  const peak = Math.max(...series, 1);
  const step = width / Math.max(series.length - 1, 1);
  const points = series.map((v, i) => `${(i * step).toFixed(1)},${(height - (v / peak) * (height - 2)).toFixed(1)}`);
  return svg(
    "svg",
    { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": label, height },
    svg("polygon", { class: "area", points: `0,${height} ${points.join(" ")} ${width},${height}` }),
    svg("polyline", { class: "line", points: points.join(" "), "vector-effect": "non-scaling-stroke" }),
  );
}

// The last complete interval's rate (the current one is still filling).
function rateNow(series) {
  return series.length > 1 ? series[series.length - 2] : 0;
}

function renderThroughput() {
  const t = state.throughput;
  if (!t) return;
  const series = t.service;
  const fetched = series.reduce((a, v) => a + v * t.bucket_seconds, 0);
  const peak = Math.max(...series, 0);
  $("throughput-chart").replaceChildren(rateChart(series, `throughput of the service, last ${series.length * t.bucket_seconds / 60} minutes`, 60));
  $("throughput-text").textContent = fetched > 0
    ? `Throughput, last 10 minutes: now ${size(rateNow(series))}/s, peak ${size(peak)}/s, ${size(fetched)} fetched`
    : "Throughput, last 10 minutes: nothing fetched";
}

// A running download's series (in a fleet: its nodes' together).
function seriesOf(id) {
  const t = state.throughput;
  if (!t) return null;
  let sum = null;
  for (const d of t.downloads) {
    if (d.task_id !== id) continue;
    sum = sum ? sum.map((v, i) => v + d.bytes_per_second[i]) : [...d.bytes_per_second];
  }
  return sum;
}

function downloadChart(d) {
  const series = seriesOf(taskId(d.model));
  if (!series || !series.some((v) => v > 0)) return null;
  // Its last 2 minutes.
  const recent = series.slice(-Math.round(120 / state.throughput.bucket_seconds));
  return el("div", { class: "spark", title: `speed of ${d.model.hf_repo}, last 2 minutes` }, rateChart(recent, `speed of ${d.model.hf_repo}, last 2 minutes`, 28));
}

const COLOURS = ["#2457c5", "#18794e", "#a35c00", "#7a3fb0", "#b42318", "#0e7490", "#6b6f19", "#9d2c6f"];

// What fills the disk: each model's share of the cache, and within a model, what each revision
// holds alone and what its revisions share (from the list's unique_bytes and model_size_bytes).
function usageOf(models) {
  const byRepo = new Map();
  for (const m of models) {
    const u = byRepo.get(m.model.hf_repo) || { repo: m.model.hf_repo, total: 0, revisions: [], summed: 0 };
    u.revisions.push(m);
    u.summed += m.size_bytes || 0;
    if (m.model_size_bytes != null) u.total = m.model_size_bytes;
    byRepo.set(u.repo, u);
  }
  for (const u of byRepo.values()) {
    if (!u.total) u.total = u.summed;
    const alone = u.revisions.reduce((a, m) => a + (m.unique_bytes ?? m.size_bytes ?? 0), 0);
    u.shared = Math.max(u.total - alone, 0);
  }
  return [...byRepo.values()].sort((a, b) => b.total - a.total || a.repo.localeCompare(b.repo));
}

function renderUsage() {
  // From the largest revisions: the models they belong to, each with the revisions among them.
  const usage = usageOf(state.largest);
  const cache = state.space ? state.space.cache_size_bytes : 0;
  $("usage-section").hidden = usage.length === 0;
  if (!usage.length) return;
  const shown = usage.slice(0, 12);
  const rest = usage.slice(12);
  const width = 600;
  const whole = Math.max(cache, usage.reduce((a, u) => a + u.total, 0), 1);
  // The cache as one bar: a segment per model, the rest (others, metadata) in grey.
  let x = 0;
  const segments = shown.map((u, i) => {
    const w = (u.total / whole) * width;
    const rect = svg("rect", { x: x.toFixed(2), y: 0, width: Math.max(w, 0).toFixed(2), height: 20, fill: COLOURS[i % COLOURS.length], "data-repo": u.repo }, tip(`${u.repo}: ${size(u.total)}`));
    x += w;
    return rect;
  });
  const other = whole - shown.reduce((a, u) => a + u.total, 0);
  if (other > 0) segments.push(svg("rect", { x: x.toFixed(2), y: 0, width: (width - x).toFixed(2), height: 20, class: "other" }, tip(`${rest.length ? `${rest.length} more model(s) and ` : ""}other files: ${size(other)}`)));
  $("usage-bar").replaceChildren(svg("svg", { class: "usage", viewBox: `0 0 ${width} 20`, preserveAspectRatio: "none", role: "img", "aria-label": `the cache, ${size(whole)}, by model` }, ...segments));
  const largest = shown[0].total || 1;
  $("usage-rows").replaceChildren(
    ...shown.map((u, i) => {
      const colour = COLOURS[i % COLOURS.length];
      let at = 0;
      const parts = [];
      const words = [];
      for (const m of u.revisions) {
        const alone = m.unique_bytes ?? m.size_bytes ?? 0;
        const name = m.model.hf_commit ? m.model.hf_commit.slice(0, 12) : "no revision";
        const refs = m.refs && m.refs.length ? ` (${m.refs.join(", ")})` : "";
        const w = (alone / largest) * width;
        parts.push(svg("rect", { x: at.toFixed(2), y: 0, width: w.toFixed(2), height: 14, fill: colour, class: "alone", "data-commit": m.model.hf_commit || "" }, tip(`${name}${refs} alone: ${size(alone)}`)));
        at += w;
        words.push(`${name}${refs} ${size(alone)} alone`);
      }
      if (u.shared > 0) {
        const w = (u.shared / largest) * width;
        parts.push(svg("rect", { x: at.toFixed(2), y: 0, width: w.toFixed(2), height: 14, fill: colour, class: "shared" }, tip(`shared by its revisions: ${size(u.shared)}`)));
        words.push(`${size(u.shared)} shared by its revisions`);
      }
      return el(
        "li",
        { "data-repo": u.repo },
        el("span", { class: "usage-name" }, svg("svg", { class: "swatch", viewBox: "0 0 10 10", "aria-hidden": "true" }, svg("rect", { width: 10, height: 10, rx: 2, fill: colour })), u.repo, " ", el("strong", {}, size(u.total))),
        svg("svg", { class: "usage-model", viewBox: `0 0 ${width} 14`, preserveAspectRatio: "none", role: "img", "aria-label": `${u.repo}: ${words.join(", ")}` }, ...parts),
        el("span", { class: "meta" }, words.join("; ")),
      );
    }),
  );
  $("usage-more").textContent = rest.length ? `and ${rest.length} more model(s), ${size(rest.reduce((a, u) => a + u.total, 0))}` : "";
}

// -- rendering -----------------------------------------------------------------------------

function renderDisk(space) {
  const used = space.cache_size_bytes;
  const total = used + space.available_bytes;
  const share = total > 0 ? (100 * used) / total : 0;
  $("disk-used").style.width = `${share.toFixed(1)}%`;
  $("disk-bar").setAttribute("aria-label", `cache ${share.toFixed(0)}% of the space it can use`);
  $("disk-text").textContent = `Cache ${size(used)}, ${size(space.available_bytes)} free (${space.cache_path})`;
}

function renderFleet() {
  // In a fleet: each node's cache and free space, and the nodes that did not answer (their
  // models and downloads are not on the page until they do).
  const fleet = $("fleet");
  fleet.hidden = state.nodes.length === 0;
  if (fleet.hidden) return;
  const silent = new Map(state.unanswered.map((n) => [n.node_id, n]));
  for (const n of state.nodes) if (n.unreachable || n.gone) silent.set(n.node_id, n);
  $("fleet-title").textContent = `Fleet: ${state.nodes.length} node(s)${silent.size ? `, ${silent.size} not answering` : ""}`;
  $("fleet-nodes").replaceChildren(
    ...state.nodes.map((n) => {
      const quiet = silent.get(n.node_id);
      const text = quiet
        ? `${quiet.gone ? "gone" : "unreachable"}: ${quiet.error_message}`
        : `cache ${size(n.cache_size_bytes)}, ${size(n.available_bytes)} free (${n.cache_path})`;
      return el(
        "li",
        { class: quiet ? "node bad" : "node", "data-node": n.node_id },
        el("span", { class: "node-id" }, nodeName(n.node_id)),
        ` ${n.address || ""} `,
        text,
      );
    }),
  );
}

function renderDownloads() {
  const list = $("downloads");
  const items = [...state.downloads.values()];
  $("no-downloads").hidden = items.length > 0;
  list.replaceChildren(...items.map(downloadCard));
  document.title = items.length ? `(${items.length}) Models - vLLM API server` : "Models - vLLM API server";
}

function figuresOf(p) {
  let figures;
  if (p.total_bytes !== null && p.total_bytes !== undefined) {
    figures = `${p.phase}: ${size(p.downloaded_bytes || 0)} of ${size(p.total_bytes)}`;
    if (p.percent !== null && p.percent !== undefined) figures += ` (${p.percent.toFixed(1)}%)`;
    // A speed from the first few bytes (a small file before the large ones) says nothing yet;
    // the service gives an ETA only once the speed was measured a few seconds.
    if (p.bytes_per_second >= 1000) figures += `, ${size(p.bytes_per_second)}/s`;
    if (p.eta_seconds !== null && p.eta_seconds !== undefined) figures += `, ${duration(p.eta_seconds)} left`;
  } else figures = `${p.phase || "starting"}...`;
  return figures;
}

// In a fleet: one line and one bar per node that runs (or waits to run) the download.
function nodeBars(d) {
  const rows = [...d.byNode.values()].sort((a, b) => a.node_id.localeCompare(b.node_id));
  return el(
    "ul",
    { class: "node-bars" },
    ...rows.map((n) => {
      const p = n.progress || {};
      const text =
        n.status === "DOWNLOADING"
          ? figuresOf(p)
          : `${n.status || "no answer"}${n.error_message ? `: ${n.error_message}` : ""}`;
      return el(
        "li",
        { "data-node": n.node_id },
        el("span", { class: "node-id" }, nodeName(n.node_id)),
        " ",
        el("span", { class: "figures" }, text),
        el("progress", {
          max: p.total_bytes || 1,
          value: p.total_bytes ? p.downloaded_bytes || 0 : null,
          "aria-label": `progress of ${d.model.hf_repo} on node ${nodeName(n.node_id)}`,
        }),
      );
    }),
  );
}

function downloadCard(d) {
  if (d.byNode && d.byNode.size) return fleetDownloadCard(d);
  const p = d.progress || {};
  const queued = p.phase === "queued";
  let figures = queued ? `queued: #${p.queue_position} in line` : figuresOf(p);
  if (p.attempt > 1) figures += `, attempt ${p.attempt}`;
  const bar = queued
    ? null
    : el("progress", {
        max: p.total_bytes || 1,
        value: p.total_bytes ? (p.phase === "verifying" ? p.verified_bytes || 0 : p.downloaded_bytes || 0) : null,
        "aria-label": `progress of ${d.model.hf_repo}`,
      });
  const cancel = el("button", { type: "button", onclick: () => cancelDownload(d.model) }, "Cancel");
  return el(
    "li",
    { class: "card", "data-task": taskId(d.model) },
    el("div", { class: "name" }, modelName(d.model), el("span", { class: `status ${queued ? "queued" : "DOWNLOADING"}` }, queued ? "QUEUED" : "DOWNLOADING")),
    el("div", { class: "meta figures" }, figures),
    bar,
    queued ? null : downloadChart(d),
    p.bandwidth_note ? el("div", { class: "note bad" }, p.bandwidth_note) : null,
    el("div", { class: "buttons" }, cancel),
  );
}

function fleetDownloadCard(d) {
  const cancel = el("button", { type: "button", onclick: () => cancelDownload(d.model) }, "Cancel");
  return el(
    "li",
    { class: "card", "data-task": taskId(d.model) },
    el("div", { class: "name" }, modelName(d.model), el("span", { class: "status DOWNLOADING" }, "DOWNLOADING")),
    el("div", { class: "meta" }, `on ${d.byNode.size} node(s)`),
    nodeBars(d),
    el("div", { class: "buttons" }, cancel),
  );
}

function renderModels() {
  const list = $("models");
  const searching = $("search").value.trim() !== "";
  $("no-models").hidden = state.models.length > 0;
  $("no-models").textContent = searching ? "No cached model matches." : "No model in the cache yet.";
  list.replaceChildren(...state.models.map(modelCard));
  $("models-count").textContent = state.modelsTotal > state.models.length
    ? `${state.models.length} of ${state.modelsTotal} shown`
    : `${state.modelsTotal} revision(s)`;
  $("more-models").hidden = !state.nextCursor;
}

function modelCard(m) {
  const commit = m.model.hf_commit;
  const meta = [
    commit ? `commit ${commit.slice(0, 12)}` : "no revision yet",
    m.refs && m.refs.length ? `refs ${m.refs.join(", ")}` : null,
    size(m.size_bytes),
    m.selection ? `files: ${selectionWords(m.selection)}` : null,
    m.nodes ? `on ${m.nodes.length} of ${state.nodes.length || m.nodes.length} node(s): ${m.nodes.map(nodeName).join(", ")}` : null,
  ].filter(Boolean);
  const inUse = (m.in_use_by || []).map((u) => `${u.server} (${u.model})`).join(", ");
  const update = (m.refs || []).map((r) => state.updates.get(`${m.model.hf_repo}@${r}`)).find((u) => u && u.update_available);
  const buttons = [
    el("button", { type: "button", onclick: () => verify(m) , disabled: !commit }, "Verify"),
    el("button", { type: "button", onclick: () => pinToggle(m), disabled: !commit, title: "A pinned revision is never evicted nor pruned" }, m.pinned ? "Unpin" : "Pin"),
    el("button", { type: "button", onclick: () => remove(m) }, "Delete"),
  ];
  if (update) buttons.unshift(el("button", { type: "button", class: "primary", onclick: () => startUpdate(update) }, `Update (${size(update.bytes_to_download)})`));
  return el(
    "li",
    { class: "card", "data-repo": m.model.hf_repo, "data-commit": commit || "" },
    el("div", { class: "name" }, m.model.hf_repo, el("span", { class: `status ${m.status}` }, m.status)),
    el("div", { class: "meta" }, meta.join(" | ")),
    inUse ? el("div", { class: "note" }, `in use by ${inUse}`) : null,
    m.pinned ? el("div", { class: "note pinned" }, "pinned: never evicted nor pruned") : null,
    update ? el("div", { class: "note" }, `${update.ref} moved to ${update.hub_commit.slice(0, 12)} on the Hub`) : null,
    m.error_message ? el("div", { class: "note bad" }, m.error_message) : null,
    el("div", { class: "buttons" }, ...buttons),
  );
}

function renderProblems() {
  $("problems-section").hidden = state.problems.length === 0;
  $("problems").replaceChildren(
    ...state.problems.map((p) => el("li", {}, el("time", { datetime: p.time.toISOString() }, p.time.toLocaleTimeString()), " ", p.text)),
  );
}

// -- actions -------------------------------------------------------------------------------

function confirmDialog(text, items, action) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-list").replaceChildren(...items.map((i) => el("li", {}, i)));
  $("confirm-ok").textContent = action;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function cancelDownload(model) {
  try {
    await api("DELETE", "/api/models", model);
  } catch (error) {
    alertUser(`Cancel ${modelName(model)}: ${error.message}`);
  }
}

async function remove(m) {
  const commit = m.model.hf_commit;
  const what = commit ? `${m.model.hf_repo} at ${commit.slice(0, 12)}` : m.model.hf_repo;
  const refs = m.refs && m.refs.length ? ` (${m.refs.join(", ")})` : "";
  const sure = await confirmDialog(`Delete ${what}${refs}? This frees up to ${size(m.size_bytes)} (files another revision shares stay).`, [], "Delete");
  if (!sure) return;
  try {
    const answer = await api("DELETE", "/api/models", m.model);
    alertUser(`${what}: ${answer.status}, ${size(answer.freed_bytes)} freed`, "info");
  } catch (error) {
    alertUser(`Delete ${what}: ${error.message}`);
  }
  refresh();
}

async function pinToggle(m) {
  const what = `${m.model.hf_repo} at ${(m.model.hf_commit || "").slice(0, 12)}`;
  try {
    await api(m.pinned ? "DELETE" : "PUT", "/api/models/pin", m.model);
    alertUser(`${what}: ${m.pinned ? "unpinned" : "pinned (never evicted nor pruned)"}`, "info");
  } catch (error) {
    alertUser(`${m.pinned ? "Unpin" : "Pin"} ${what}: ${error.message}`);
  }
  refresh();
}

async function verify(m) {
  const what = `${m.model.hf_repo} at ${(m.model.hf_commit || "").slice(0, 12)}`;
  try {
    const report = await api("POST", "/api/models/verify", m.model);
    if (report.verified) alertUser(`${what}: verified, ${report.files_checked} files match their checksums`, "info");
    else {
      const bad = [...report.mismatched.map((f) => `${f} does not match`), ...report.missing.map((f) => `${f} is missing`)];
      const text = `${what}: verification failed: ${bad.join(", ")}`;
      alertUser(text);
      problem(text);
    }
  } catch (error) {
    alertUser(`Verify ${what}: ${error.message}`);
  }
  refresh();
}

async function startUpdate(update) {
  try {
    await api("POST", "/api/models/download", update.model);
  } catch (error) {
    alertUser(`Update ${update.model.hf_repo}: ${error.message}`);
  }
}

async function checkUpdates() {
  // The service checks within a budget of Hub calls: what it has not checked yet comes back
  // "pending", and each next ask (which waits up to 10 s for more) brings more answers.
  const button = $("check-updates");
  button.disabled = true;
  try {
    let answer = await api("GET", "/api/models/updates?refresh=true&wait=5");
    const reported = new Set();
    let progress = null; // one box, its words updated as answers come
    const say = (text) => {
      if (progress && progress.isConnected) progress.querySelector("span").textContent = text;
      else { alertUser(text, "info"); progress = $("alerts").lastElementChild; }
    };
    for (;;) {
      state.updates = new Map(answer.models.map((u) => [`${u.model.hf_repo}@${u.ref}`, u]));
      for (const u of answer.models.filter((x) => x.error && !x.pending)) {
        const key = `${u.model.hf_repo}@${u.ref}`;
        if (!reported.has(key)) problem(`${u.model.hf_repo} (${u.ref}): the update check failed: ${u.error}`);
        reported.add(key);
      }
      renderModels();
      const moved = answer.models.filter((u) => u.update_available).length;
      const pending = answer.models.filter((u) => u.pending).length;
      if (!pending) {
        if (progress) progress.remove();
        alertUser(moved ? `${moved} update(s) available` : "Every branch is up to date", "info");
        break;
      }
      const paused = answer.budget && answer.budget.paused_until;
      say(
        `${moved} update(s) available so far; ${pending} of ${answer.models.length} still being checked` +
          (paused ? ` (the Hub asked to wait: on at ${new Date(paused * 1000).toLocaleTimeString()})` : ""),
      );
      answer = await api("GET", "/api/models/updates?wait=10");
    }
  } catch (error) {
    alertUser(`Check for updates: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

async function prune() {
  try {
    const plan = await api("POST", "/api/models/prune", { dry_run: true });
    const items = plan.revisions.map((r) => `${r.model.hf_repo} at ${(r.model.hf_commit || "(no revision)").slice(0, 12)}: ${size(r.size_bytes)}`);
    for (const k of plan.kept) items.push(`kept: ${k.model.hf_repo} at ${(k.model.hf_commit || "").slice(0, 12)}: ${k.reason}`);
    if (plan.note) {
      // A vLLM server did not answer: what it serves is not known, and a prune is refused
      // unless forced. A warning, with the forced prune offered (and confirmed).
      const offer = plan.revisions.length
        ? { label: "Prune anyway", run: () => prunePlanned(plan, items, true) }
        : null;
      alertUser(`Prune: ${plan.note.replace(/ unless \?force=true$/, " unless forced")}`, "warn", offer);
      return;
    }
    if (!plan.revisions.length) {
      alertUser("Nothing to prune", "info");
      return;
    }
    await prunePlanned(plan, items, false);
    return;
  } catch (error) {
    alertUser(`Prune: ${error.message}`);
  }
  refresh();
}

async function prunePlanned(plan, items, force) {
  try {
    const what = `Remove ${plan.revisions.length} revision(s) no branch or tag names, freeing ${size(plan.freed_bytes)}?`;
    const warning = force ? " A vLLM server did not answer: one it serves may be among them." : "";
    const sure = await confirmDialog(what + warning, items, force ? "Prune anyway" : "Prune");
    if (!sure) return;
    const done = await api("POST", force ? "/api/models/prune?force=true" : "/api/models/prune", { dry_run: false });
    alertUser(`Pruned ${done.revisions.length} revision(s), ${size(done.freed_bytes)} freed`, "info");
  } catch (error) {
    alertUser(`Prune: ${error.message}`);
  }
  refresh();
}

// -- the form ------------------------------------------------------------------------------

function globs(text) {
  return text.split(",").map((g) => g.trim()).filter(Boolean);
}

function valid(input) {
  // The API's own rule (its JSON pattern, put in the page by the service): checked here with the
  // pattern as the API writes it (an HTML pattern attribute would read it with the 'v' flag).
  const pattern = input.dataset.pattern;
  return input.checkValidity() && (!input.value || !pattern || new RegExp(pattern).test(input.value));
}

function formBody() {
  const repo = $("repo");
  const revision = $("revision");
  for (const input of [repo, revision]) input.setAttribute("aria-invalid", "false");
  repo.value = repo.value.trim();
  revision.value = revision.value.trim();
  if (!repo.value || !valid(repo)) {
    repo.setAttribute("aria-invalid", "true");
    repo.focus();
    throw new Error("The repository is 'namespace/name': letters, digits, '_', '.' and '-', one '/' (e.g. meta-llama/Llama-3.1-8B-Instruct).");
  }
  if (!valid(revision)) {
    revision.setAttribute("aria-invalid", "true");
    revision.focus();
    throw new Error("The revision is a branch or tag name (letters, digits, '_', '.', '-', '/') or a 40-character commit id.");
  }
  const body = { hf_repo: repo.value };
  if (revision.value) body.hf_commit = revision.value;
  if ($("files").value) body.files = $("files").value;
  const include = globs($("include").value);
  const exclude = globs($("exclude").value);
  if (include.length) body.allow_patterns = include;
  if (exclude.length) body.ignore_patterns = exclude;
  return body;
}

// The form's body, or null after saying in the form what to fix.
function checkedBody() {
  $("form-error").textContent = "";
  try {
    return formBody();
  } catch (error) {
    $("form-error").textContent = error.message;
    return null;
  }
}

async function preview() {
  const out = $("plan");
  const body = checkedBody();
  if (!body) return;
  try {
    const plan = await api("POST", "/api/models/plan", body);
    const fits = plan.fits ? el("span", { class: "good" }, "fits") : el("span", { class: "bad" }, `does not fit (${size(plan.available_bytes)} available)`);
    const groups = plan.weights.map((w) => el("li", {}, `${w.selected ? "[x]" : "[ ]"} ${w.format}${w.quantization ? ` ${w.quantization}` : ""} in ${w.folder || "/"}: ${w.files.length} file(s), ${size(w.size_bytes)} (pattern ${w.pattern})`));
    out.replaceChildren(
      ...[
      el("p", {}, `${plan.selected_files} of ${plan.files.length} files, ${size(plan.selected_bytes)}; ${size(plan.missing_bytes)} to download: `, fits),
      plan.note ? el("p", { class: "bad" }, plan.note) : null,
      groups.length ? el("p", {}, "Weights in this revision (put a pattern in 'Also these' to take one):") : null,
      groups.length ? el("ul", {}, ...groups) : null,
      ].filter(Boolean),
    );
    out.hidden = false;
  } catch (error) {
    out.hidden = true;
    $("form-error").textContent = error.message;
  }
}

async function submit(event) {
  event.preventDefault();
  const body = checkedBody();
  if (!body) return;
  const button = $("start");
  button.disabled = true;
  try {
    const answer = await api("POST", "/api/models/download", body);
    if (answer.status === "DOWNLOADED") alertUser(`${modelName(body)} is already downloaded`, "info");
    $("plan").hidden = true;
    refreshSoon();
  } catch (error) {
    $("form-error").textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

async function about() {
  // Which service this page is looking at: its host and version, and where its API and metrics are.
  try {
    const health = await api("GET", "/api/health");
    $("about-host").textContent = `${location.host}${health.version ? `, version ${health.version}` : ""}`;
  } catch (_) {
    $("about-host").textContent = location.host;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("add").addEventListener("submit", submit);
  $("preview").addEventListener("click", preview);
  $("check-updates").addEventListener("click", checkUpdates);
  $("prune").addEventListener("click", prune);
  $("search").addEventListener("input", searchSoon);
  $("sort").addEventListener("change", searchSoon);
  $("more-models").addEventListener("click", moreModels);
  about();
  refresh();
  stream();
  setInterval(() => {
    if (throughputLive()) loadThroughput();
  }, 2000);
});
