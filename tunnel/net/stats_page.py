"""The ``/stats`` page of the admin listener: one self-contained HTML document.

A Python string rather than a data file, so nothing needs packaging and the page works offline
and from a wheel alike. Its script asks ``stats.json`` once a second and updates the page in
place: header (version, uptime, health), totals, two charts of the last five minutes drawn on
canvases, routes with their backends, the open tunnels (each with a close button that POSTs
``tunnels/<id>/close``) and the listeners. Byte rates are differences of the backends' totals
between two documents. Text from the document only ever enters the DOM through ``textContent``;
``CONTENT_SECURITY_POLICY`` allows this page's own script and style, by hash, and nothing else,
so even a bug there cannot run a script that a route name or client address smuggled in.

Hooks for tests: each tunnel row is ``tr[data-tunnel-id=ID]`` with cells of class ``client``,
``route``, ``backend``, ``age``, ``idle``, ``bytes-up`` and ``bytes-down``; ``window.statsPage``
holds ``loadId`` (set once per load), ``refreshes`` and ``lastError``.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
:root {
  --bg: #f4f6f9; --panel: #ffffff; --text: #1b2232; --muted: #687189; --line: #e1e5ec;
  --head: #f8f9fb; --ok: #16924a; --bad: #d23b3b; --warn: #c98a00; --idle: #8a93a6;
  --up: #2f6bd8; --down: #e07b1c; --open: #119c8a; --accent: #2f6bd8;
  color-scheme: light dark;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #12161e; --panel: #1a1f2a; --text: #e3e7ef; --muted: #8d97ab; --line: #2a3140;
    --head: #1f2532; --ok: #3cc374; --bad: #f06262; --warn: #e8b531; --idle: #7d879b;
    --up: #5b93f5; --down: #f39a45; --open: #2fc4ae; --accent: #5b93f5;
  }
}
* { box-sizing: border-box; }
body {
  margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    sans-serif;
}
.mono, td.client, td.tunnel-id, td.address, .detail {
  font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 12.5px;
}
header {
  display: flex; flex-wrap: wrap; align-items: center; gap: 10px 18px;
  padding: 12px 24px; background: var(--panel); border-bottom: 1px solid var(--line);
}
header h1 { margin: 0; font-size: 20px; letter-spacing: .02em; }
header .item { color: var(--muted); }
header .item b { color: var(--text); font-weight: 600; font-variant-numeric: tabular-nums; }
header .spacer { flex: 1; }
.pill {
  display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px;
  font-weight: 600; color: #fff; background: var(--idle); white-space: nowrap;
}
.pill.up, .pill.serving { background: var(--ok); }
.pill.down { background: var(--bad); }
.pill.draining { background: var(--warn); }
.live { color: var(--muted); font-size: 12px; white-space: nowrap; }
.live::before {
  content: ""; display: inline-block; width: 8px; height: 8px; margin-right: 6px;
  border-radius: 50%; background: var(--idle); vertical-align: 0;
}
.live.ok::before { background: var(--ok); }
.live.stale { color: var(--bad); }
.live.stale::before { background: var(--bad); }
main { padding: 18px 24px 32px; max-width: 1400px; margin: 0 auto; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.card, .panel { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; }
.card { padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; }
.card .value { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .value small { font-size: 13px; color: var(--muted); font-weight: 500; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 12px;
  margin-top: 12px; }
figure { margin: 0; padding: 10px 14px 8px; }
figcaption { display: flex; gap: 14px; align-items: baseline; font-weight: 600; }
figcaption .key { font-weight: 500; color: var(--muted); font-size: 12px; }
figcaption .key::before {
  content: ""; display: inline-block; width: 10px; height: 3px; margin-right: 5px;
  vertical-align: middle; border-radius: 2px; background: currentColor;
}
.key.open { color: var(--open); }
.key.up { color: var(--up); }
.key.down { color: var(--down); }
canvas { display: block; width: 100%; height: 170px; margin-top: 4px; }
section.panel { margin-top: 16px; overflow: hidden; }
section.panel > h2 {
  display: flex; align-items: baseline; gap: 12px; margin: 0; padding: 10px 14px;
  font-size: 15px; border-bottom: 1px solid var(--line);
}
h2 .count { color: var(--muted); font-weight: 500; font-size: 13px; }
h2 input {
  margin-left: auto; font: inherit; font-size: 13px; font-weight: 400; padding: 3px 8px;
  width: 240px; border: 1px solid var(--line); border-radius: 6px; background: var(--bg);
  color: var(--text);
}
.scroll { overflow-x: auto; }
table { width: 100%; border-collapse: collapse; }
th, td { padding: 6px 14px; text-align: left; white-space: nowrap; }
th {
  background: var(--head); color: var(--muted); font-size: 12px; font-weight: 600;
  border-bottom: 1px solid var(--line);
}
td { border-bottom: 1px solid var(--line); }
tbody tr:last-child td { border-bottom: 0; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.route td { background: var(--head); font-weight: 600; }
tr.route td.detail { font-weight: 400; }
tr.backend td.name { padding-left: 30px; }
td.detail { color: var(--muted); white-space: normal; }
td.muted, .muted { color: var(--muted); }
tr.closing td { opacity: .45; }
.empty { margin: 0; padding: 14px; color: var(--muted); }
button.close {
  font: inherit; font-size: 12px; padding: 1px 10px; border-radius: 6px; cursor: pointer;
  border: 1px solid var(--line); background: var(--panel); color: var(--text);
}
button.close:hover { border-color: var(--bad); color: var(--bad); }
button.close.armed { background: var(--bad); border-color: var(--bad); color: #fff; }
button.close:disabled { opacity: .5; cursor: default; }
#notice { font-size: 13px; font-weight: 500; color: var(--muted); }
#notice.error { color: var(--bad); }
#notice.done { color: var(--ok); }
footer { color: var(--muted); font-size: 12px; margin-top: 14px; }
footer a { color: var(--accent); }
"""

BODY = """
<header>
  <h1>tunnel</h1>
  <span class="item">version <b id="version">&ndash;</b></span>
  <span class="item">uptime <b id="uptime">&ndash;</b></span>
  <span class="item" id="workers-item" hidden>workers <b id="workers">&ndash;</b></span>
  <span id="health" class="pill">…</span>
  <span class="spacer"></span>
  <span id="live" class="live">connecting…</span>
</header>
<main>
  <noscript><p>This page needs JavaScript; the same data is at <a href="stats.json">
    stats.json</a>.</p></noscript>
  <div class="cards">
    <div class="card"><div class="label">open tunnels</div>
      <div class="value" id="total-open">&ndash;</div></div>
    <div class="card"><div class="label">up (client → backend)</div>
      <div class="value" id="total-up-rate">&ndash;</div></div>
    <div class="card"><div class="label">down (backend → client)</div>
      <div class="value" id="total-down-rate">&ndash;</div></div>
    <div class="card"><div class="label">backends up</div>
      <div class="value" id="backends-up">&ndash;</div></div>
    <div class="card"><div class="label">tunnels since start</div>
      <div class="value" id="total-tunnels">&ndash;</div></div>
  </div>
  <div class="charts">
    <figure class="panel">
      <figcaption>Open tunnels <span class="key open">last 5 minutes</span></figcaption>
      <canvas id="chart-open" aria-label="open tunnels, last 5 minutes"></canvas>
    </figure>
    <figure class="panel">
      <figcaption>Throughput <span class="key up">up</span><span class="key down">down</span>
      </figcaption>
      <canvas id="chart-bytes" aria-label="bytes per second, last 5 minutes"></canvas>
    </figure>
  </div>
  <section class="panel">
    <h2>Routes and backends <span class="count" id="routes-count"></span></h2>
    <div class="scroll"><table id="routes">
      <thead><tr><th>name</th><th>hosts · path / url</th><th>state</th>
        <th class="num">open</th><th class="num">tunnels</th><th class="num">up</th>
        <th class="num">down</th><th class="num">up/s</th><th class="num">down/s</th></tr></thead>
      <tbody></tbody>
    </table></div>
    <p class="empty" id="routes-empty" hidden>No routes.</p>
  </section>
  <section class="panel">
    <h2>Open tunnels <span class="count" id="tunnels-count"></span>
      <span id="notice" role="status"></span>
      <input id="filter" type="search" placeholder="filter: client, route, backend, id"
        aria-label="filter tunnels"></h2>
    <div class="scroll"><table id="tunnels">
      <thead><tr><th>id</th><th>client</th><th>route</th><th>backend</th>
        <th class="num">age</th><th class="num">idle</th><th class="num">up</th>
        <th class="num">down</th><th></th></tr></thead>
      <tbody></tbody>
    </table></div>
    <p class="empty" id="tunnels-empty" hidden>No open tunnels.</p>
  </section>
  <section class="panel">
    <h2>Listeners</h2>
    <div class="scroll"><table id="listeners">
      <thead><tr><th>address</th><th>TLS</th><th>redirects to HTTPS</th></tr></thead>
      <tbody></tbody>
    </table></div>
  </section>
  <footer>Refreshed every second from <a href="stats.json">stats.json</a>;
    Prometheus metrics at <a href="metrics">metrics</a>.</footer>
</main>
"""

SCRIPT = """
"use strict";
const REFRESH_MS = 1000;
const FETCH_TIMEOUT_MS = 5000;
const WINDOW_S = 300;
const MAX_ROWS = 1000;
const NOTICE_MS = 8000;
const NONE = "\\u2013";

const statsPage = {
  loadId: Date.now().toString(36) + "-" + Math.random().toString(36).slice(2),
  refreshes: 0,
  lastError: "",
};
window.statsPage = statsPage;

const byId = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setText(node, text) {
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

function setClass(node, className) {
  if (node.className !== className) node.className = className;
}

const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const list = (value) => (Array.isArray(value) ? value : []);

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

function bytes(value) {
  if (!isNumber(value)) return NONE;
  let n = value;
  let unit = 0;
  while (Math.abs(n) >= 1024 && unit < UNITS.length - 1) {
    n /= 1024;
    unit += 1;
  }
  if (unit === 0) return Math.round(n) + " B";
  return (Math.abs(n) < 100 ? n.toFixed(1) : Math.round(n).toString()) + " " + UNITS[unit];
}

const perSecond = (value) => (isNumber(value) ? bytes(value) + "/s" : NONE);
const count = (value) => (isNumber(value) ? value.toLocaleString("en-US") : NONE);
const pad = (n) => String(n).padStart(2, "0");

function duration(value) {
  if (!isNumber(value) || value < 0) return NONE;
  if (value < 10) return value.toFixed(1) + "s";
  const s = Math.floor(value);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + pad(s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + pad(Math.floor(s / 60) % 60) + "m";
  return Math.floor(s / 86400) + "d " + pad(Math.floor(s / 3600) % 24) + "h";
}

// Keyed rows: a row is built once per key and then only its changed cells are rewritten, so
// the table does not flicker, a selection survives and a close button stays where it was.
const rowsOf = new WeakMap();

function syncRows(tbody, items, key, build, fill) {
  let rows = rowsOf.get(tbody);
  if (!rows) {
    rows = new Map();
    rowsOf.set(tbody, rows);
  }
  const kept = new Set();
  let index = 0;
  for (const item of items) {
    const k = key(item);
    if (kept.has(k)) continue;
    kept.add(k);
    let row = rows.get(k);
    if (!row) {
      row = build(item);
      rows.set(k, row);
    }
    fill(row, item);
    const here = tbody.children[index] || null;
    if (here !== row) tbody.insertBefore(row, here);
    index += 1;
  }
  for (const [k, row] of rows) {
    if (!kept.has(k)) {
      row.remove();
      rows.delete(k);
    }
  }
}

function buildRow(columns, numeric) {
  const row = element("tr");
  row.cellsByName = {};
  for (const name of columns) {
    const cell = element("td", numeric.includes(name) ? name + " num" : name);
    row.cellsByName[name] = cell;
    row.appendChild(cell);
  }
  return row;
}

function fillCells(row, texts) {
  for (const [name, text] of Object.entries(texts)) setText(row.cellsByName[name], text);
}

// Routes and backends ------------------------------------------------------------------------

const ROUTE_COLUMNS = ["name", "detail", "state", "open", "total", "up", "down", "up-rate",
  "down-rate"];
const ROUTE_NUMERIC = ["open", "total", "up", "down", "up-rate", "down-rate"];

function pill(cell, state) {
  let badge = cell.firstChild;
  if (!badge) badge = cell.appendChild(element("span"));
  const known = ["up", "down", "draining"].includes(state) ? state : "unknown";
  setClass(badge, "pill " + known);
  setText(badge, state === undefined || state === null ? "?" : state);
}

function renderRoutes(routes, rates) {
  const items = [];
  let up = 0;
  let all = 0;
  for (const route of routes) {
    items.push({kind: "route", key: "r\\u0000" + route.name, route});
    for (const backend of list(route.backends)) {
      const key = "b\\u0000" + route.name + "\\u0000" + backend.name;
      items.push({kind: "backend", key, route, backend});
      all += 1;
      if (backend.state === "up") up += 1;
    }
  }
  setText(byId("backends-up"), all ? up + " / " + all : NONE);
  setText(byId("routes-count"), routes.length + (routes.length === 1 ? " route" : " routes"));
  byId("routes-empty").hidden = routes.length > 0;
  syncRows(byId("routes").tBodies[0], items, (item) => item.key, (item) => {
    const row = buildRow(ROUTE_COLUMNS, ROUTE_NUMERIC);
    row.className = item.kind;
    return row;
  }, (row, item) => (item.kind === "route" ? fillRoute(row, item.route, rates)
    : fillBackend(row, item, rates)));
}

function fillRoute(row, route, rates) {
  const backends = list(route.backends);
  const number = (value) => (isNumber(value) ? value : 0);
  const sum = (field) => backends.reduce((total, b) => total + number(b[field]), 0);
  const rate = (direction) => backends.reduce((total, b) => {
    const r = rates.get(route.name + "\\u0000" + b.name);
    return r && isNumber(total) ? total + r[direction] : null;
  }, 0);
  const hosts = list(route.hosts).length ? list(route.hosts).join(", ") : "any host";
  const upCount = backends.filter((b) => b.state === "up").length;
  fillCells(row, {
    name: route.name, detail: hosts + " · " + (route.path_prefix || "/"),
    state: upCount + " of " + backends.length + " up", open: count(route.open_tunnels),
    total: count(sum("tunnels_total")), up: bytes(sum("bytes_up")),
    down: bytes(sum("bytes_down")), "up-rate": perSecond(rate("up")),
    "down-rate": perSecond(rate("down")),
  });
  setClass(row.cellsByName.state, "state muted");
}

function fillBackend(row, item, rates) {
  const b = item.backend;
  const r = rates.get(item.route.name + "\\u0000" + b.name);
  fillCells(row, {
    name: b.name, detail: b.url, open: count(b.open_tunnels), total: count(b.tunnels_total),
    up: bytes(b.bytes_up), down: bytes(b.bytes_down), "up-rate": perSecond(r ? r.up : null),
    "down-rate": perSecond(r ? r.down : null),
  });
  pill(row.cellsByName.state, b.state);
}

// Tunnels ------------------------------------------------------------------------------------

const TUNNEL_COLUMNS = ["tunnel-id", "client", "route", "backend", "age", "idle", "bytes-up",
  "bytes-down"];
const TUNNEL_NUMERIC = ["age", "idle", "bytes-up", "bytes-down"];

function buildTunnelRow(tunnel) {
  const row = buildRow(TUNNEL_COLUMNS, TUNNEL_NUMERIC);
  row.dataset.tunnelId = String(tunnel.id);
  const button = element("button", "close", "close");
  button.type = "button";
  button.title = "close this tunnel (click twice)";
  button.addEventListener("click", () => closeTunnel(String(tunnel.id), button, row));
  row.appendChild(element("td", "action")).appendChild(button);
  return row;
}

function fillTunnelRow(row, t) {
  fillCells(row, {
    "tunnel-id": t.id, client: t.client, route: t.route, backend: t.backend,
    age: duration(t.age), idle: duration(t.idle), "bytes-up": bytes(t.bytes_up),
    "bytes-down": bytes(t.bytes_down),
  });
  row.cellsByName["bytes-up"].title = count(t.bytes_up) + " bytes";
  row.cellsByName["bytes-down"].title = count(t.bytes_down) + " bytes";
}

function matches(tunnel, words) {
  const text = [tunnel.id, tunnel.client, tunnel.route, tunnel.backend].join(" ").toLowerCase();
  return words.every((word) => text.includes(word));
}

function renderTunnels(tunnels) {
  const words = byId("filter").value.toLowerCase().split(/\\s+/).filter(Boolean);
  const shown = words.length ? tunnels.filter((t) => matches(t, words)) : tunnels;
  const rows = shown.slice(0, MAX_ROWS);
  let label = count(tunnels.length);
  if (words.length) label = count(shown.length) + " of " + label + " match";
  if (rows.length < shown.length) label += ", first " + count(rows.length) + " shown";
  setText(byId("tunnels-count"), label);
  byId("tunnels-empty").hidden = rows.length > 0;
  setText(byId("tunnels-empty"), tunnels.length ? "No tunnel matches." : "No open tunnels.");
  syncRows(byId("tunnels").tBodies[0], rows, (t) => String(t.id), buildTunnelRow,
    fillTunnelRow);
}

let noticeTimer = 0;

function notice(text, kind) {
  const node = byId("notice");
  setText(node, text);
  node.className = kind;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => setText(node, ""), NOTICE_MS);
}

async function closeTunnel(id, button, row) {
  if (!button.classList.contains("armed")) {
    button.classList.add("armed");
    setText(button, "close?");
    button.disarm = setTimeout(() => {
      button.classList.remove("armed");
      setText(button, "close");
    }, 3000);
    return;
  }
  clearTimeout(button.disarm);
  button.classList.remove("armed");
  setText(button, "close");
  button.disabled = true;
  try {
    const response = await fetch("tunnels/" + encodeURIComponent(id) + "/close",
      {method: "POST", cache: "no-store"});
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      row.classList.add("closing");
      notice("Closed tunnel " + id + ".", "done");
    } else {
      notice(answer.error || "Closing tunnel " + id + " failed: HTTP " + response.status,
        "error");
      button.disabled = false;
    }
  } catch (error) {
    notice("Closing tunnel " + id + " failed: " + error, "error");
    button.disabled = false;
  }
}

function renderListeners(listeners) {
  syncRows(byId("listeners").tBodies[0], listeners, (l) => String(l.address), () => {
    return buildRow(["address", "tls", "redirect"], []);
  }, (row, l) => fillCells(row, {
    address: l.address, tls: l.tls ? "yes" : "no", redirect: l.redirect_https ? "yes" : "no",
  }));
}

// History and charts -------------------------------------------------------------------------

const history = [];
let previous = null;
let lastTunnels = [];

function backendRates(routes, now, uptime) {
  const totals = new Map();
  for (const route of routes) {
    for (const b of list(route.backends)) {
      totals.set(route.name + "\\u0000" + b.name, {up: b.bytes_up, down: b.bytes_down});
    }
  }
  const rates = new Map();
  if (previous) {
    const advanced = isNumber(uptime) && isNumber(previous.uptime) && uptime > previous.uptime;
    const seconds = advanced ? uptime - previous.uptime : now - previous.now;
    for (const [key, total] of totals) {
      const before = previous.totals.get(key);
      if (!before || seconds <= 0) continue;
      const up = (total.up - before.up) / seconds;
      const down = (total.down - before.down) / seconds;
      if (isNumber(up) && isNumber(down) && up >= 0 && down >= 0) rates.set(key, {up, down});
    }
  }
  previous = {now, uptime, totals};
  return rates;
}

// The top of a chart: four grid steps of a round size (whole numbers for counts, round
// multiples of KiB, MiB... for bytes), just above the highest value.
function chartTop(value, base) {
  let unit = 1;
  while (base > 1 && value / 4 >= unit * base) unit *= base;
  const wanted = value / 4 / unit;
  const magnitude = Math.pow(10, Math.floor(Math.log10(wanted)));
  for (const m of [1, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    const step = m * magnitude;
    if (step >= wanted && (base > 1 || Number.isInteger(step))) return 4 * step * unit;
  }
  return 4 * 10 * magnitude * unit;
}

function drawChart(canvas, series, format, base) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const left = 74;
  const right = 10;
  const top = 8;
  const bottom = 20;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const end = history.length ? history[history.length - 1].t : 0;
  const start = end - WINDOW_S;
  let highest = 0;
  for (const s of series) {
    for (const point of history) {
      const v = point[s.field];
      if (isNumber(v) && v > highest) highest = v;
    }
  }
  const ceiling = highest > 0 ? chartTop(highest, base) : 4;
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = Math.round(top + plotHeight - (plotHeight * i) / 4) + 0.5;
    ctx.strokeStyle = color("--line");
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + plotWidth, y);
    ctx.stroke();
    ctx.fillStyle = color("--muted");
    ctx.textAlign = "right";
    ctx.fillText(format((ceiling * i) / 4), left - 8, y);
  }
  ctx.textBaseline = "alphabetic";
  for (let minute = 0; minute <= WINDOW_S / 60; minute++) {
    const x = left + plotWidth - (plotWidth * minute * 60) / WINDOW_S;
    ctx.textAlign = minute === 0 ? "right" : "center";
    ctx.fillText(minute === 0 ? "now" : "\\u2212" + minute + " min", x, height - 4);
  }
  const xOf = (t) => left + (plotWidth * (t - start)) / WINDOW_S;
  const yOf = (v) => top + plotHeight - (plotHeight * Math.min(v, ceiling)) / ceiling;
  for (const s of series) {
    const stroke = color(s.color);
    let run = [];
    const runs = [];
    for (const point of history) {
      const v = point[s.field];
      if (isNumber(v)) run.push([xOf(point.t), yOf(v)]);
      else if (run.length) {
        runs.push(run);
        run = [];
      }
    }
    if (run.length) runs.push(run);
    for (const points of runs) {
      ctx.beginPath();
      points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.strokeStyle = stroke;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.stroke();
      ctx.lineTo(points[points.length - 1][0], top + plotHeight);
      ctx.lineTo(points[0][0], top + plotHeight);
      ctx.closePath();
      ctx.globalAlpha = 0.1;
      ctx.fillStyle = stroke;
      ctx.fill();
      ctx.globalAlpha = 1;
    }
  }
}

function drawCharts() {
  drawChart(byId("chart-open"), [{field: "open", color: "--open"}],
    (v) => count(v), 1);
  const axisRate = (v) => (v ? perSecond(v).replace(".0 ", " ") : "0");
  drawChart(byId("chart-bytes"), [{field: "up", color: "--up"},
    {field: "down", color: "--down"}], axisRate, 1024);
}

// The refresh loop ---------------------------------------------------------------------------

function render(doc) {
  const now = performance.now() / 1000;
  const routes = list(doc.routes);
  const tunnels = list(doc.tunnels);
  setText(byId("version"), doc.version ?? "?");
  setText(byId("uptime"), duration(doc.uptime));
  byId("workers-item").hidden = !isNumber(doc.workers);
  setText(byId("workers"), count(doc.workers));
  const health = byId("health");
  setClass(health, "pill " + (doc.healthy === false ? "draining" : "serving"));
  setText(health, doc.healthy === false ? "draining" : "serving");

  const rates = backendRates(routes, now, doc.uptime);
  let up = null;
  let down = null;
  if (rates.size) {
    up = 0;
    down = 0;
    for (const r of rates.values()) {
      up += r.up;
      down += r.down;
    }
  }
  let total = 0;
  for (const route of routes) {
    for (const b of list(route.backends)) total += isNumber(b.tunnels_total) ? b.tunnels_total : 0;
  }
  setText(byId("total-open"), count(tunnels.length));
  setText(byId("total-up-rate"), perSecond(up));
  setText(byId("total-down-rate"), perSecond(down));
  setText(byId("total-tunnels"), count(total));

  history.push({t: now, open: tunnels.length, up, down});
  while (history.length && history[0].t < now - WINDOW_S - 1) history.shift();

  renderRoutes(routes, rates);
  lastTunnels = tunnels;
  renderTunnels(tunnels);
  renderListeners(list(doc.listeners));
  drawCharts();
}

function showLive(ok, why) {
  const live = byId("live");
  if (ok) {
    setClass(live, "live ok");
    setText(live, "live · every second");
  } else {
    setClass(live, "live stale");
    setText(live, "stale: " + why);
  }
}

async function refresh() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch("stats.json", {cache: "no-store", signal: controller.signal});
    if (!response.ok) throw new Error("stats.json answered HTTP " + response.status);
    render(await response.json());
    statsPage.refreshes += 1;
    statsPage.lastError = "";
    showLive(true);
  } catch (error) {
    statsPage.lastError = String(error && error.message ? error.message : error);
    showLive(false, statsPage.lastError);
  } finally {
    clearTimeout(timer);
    setTimeout(refresh, REFRESH_MS);
  }
}

byId("filter").addEventListener("input", () => renderTunnels(lastTunnels));
window.addEventListener("resize", drawCharts);
refresh();
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

HEADERS = (("Content-Security-Policy", CONTENT_SECURITY_POLICY),)
"""Response headers the page needs besides its content type."""

PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<link rel="icon" href="data:,">\n<title>tunnel · stats</title>\n'
    f"<style>{STYLE}</style>\n</head>\n<body>{BODY}<script>{SCRIPT}</script>\n</body>\n</html>\n"
).encode()
"""The page, UTF-8."""
