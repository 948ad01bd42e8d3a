// The routing explorer. No framework, no CDN: it reads coe's own JSON API with the admin key kept in this
// tab's sessionStorage, and builds every element with textContent (queries are user text: never innerHTML).
"use strict";

const KEY = "coe.adminKey";
const SVG = "http://www.w3.org/2000/svg";
let liveTimer = null;
let lastLoad = null; // {t, calls: {expert: n}} for calls/s between polls

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

class AuthError extends Error {}

async function api(path, options) {
  const headers = {"content-type": "application/json"};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.authorization = "Bearer " + key;
  const response = await fetch(path, {...(options || {}), headers});
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  const message = body && body.error ? body.error.message : response.statusText;
  if (response.status === 401 || response.status === 403) throw new AuthError(message);
  if (!response.ok) throw new Error(message || ("HTTP " + response.status));
  return body;
}

// -- charts: horizontal bars, negative values to the left of the axis ------------------------------

function bars(container, items, opts) {
  const o = opts || {};
  container.replaceChildren();
  if (!items.length) { container.append(el("p", o.empty || "nothing", "note")); return; }
  const row = 22, label = o.labelWidth || 140, width = 420, valueW = 56;
  const plot = width - label - valueW;
  const max = Math.max(o.max || 0, ...items.map((i) => Math.abs(i.score))) || 1;
  const negative = items.some((i) => i.score < 0);
  const zero = label + (negative ? plot / 2 : 0);
  const scale = (negative ? plot / 2 : plot) / max;
  const chart = svg("svg", {width, height: row * items.length + 4, role: "img", class: "bars"});
  items.forEach((item, i) => {
    const y = i * row + 2;
    const g = svg("g", {"data-name": item.name, class: item.highlight ? "bar hl" : "bar"});
    g.append(svg("text", {x: 0, y: y + 15, class: "label"}, item.name));
    const w = Math.abs(item.score) * scale;
    g.append(svg("rect", {x: item.score < 0 ? zero - w : zero, y: y + 3, width: Math.max(w, 1), height: row - 8,
                          class: item.score < 0 ? "neg" : "pos"}));
    g.append(svg("text", {x: width - valueW + 6, y: y + 15, class: "value"},
                 o.fmt ? o.fmt(item.score) : item.score));
    chart.append(g);
  });
  if (negative) chart.append(svg("line", {x1: zero, x2: zero, y1: 0, y2: row * items.length + 4, class: "axis"}));
  container.append(chart);
}

const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%");
const num = (v, d) => (v === null || v === undefined ? "–" : Number(v).toFixed(d === undefined ? 3 : d));

function fillRows(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
    return tr;
  }));
}

function td(node) { const cell = document.createElement("td"); cell.append(node); return cell; }

// -- live -----------------------------------------------------------------------------------------

async function refreshLive() {
  let live;
  try { live = await api("/v1/explorer/live?limit=50"); }
  catch (e) { if (e instanceof AuthError) return logout(e.message); $("live-status").textContent = e.message; return; }
  const replicas = live.replicas || [];
  $("live-status").textContent = `${replicas.length} replica(s) reporting · ${live.decisions.length} recent ` +
    `decisions${live.keep_queries ? "" : " · queries are not kept (explorer.keep_queries: false)"} · ` +
    `updated ${new Date().toLocaleTimeString()}`;
  fillRows($("decisions"), live.decisions.map((d) => {
    const experts = el("span");
    (d.experts || []).forEach((e, i) => {
      if (i) experts.append(", ");
      experts.append(el("b", e.name, "expert"), ` ${num(e.score, 3)}`);
    });
    const agg = d.consensus ? "consensus (aggregator skipped)" :
      (d.aggregator_called ? d.strategy + " (aggregator)" : d.strategy) + (d.rounds > 1 ? ` · ${d.rounds} rounds` : "");
    const category = d.category ? `${d.category} ${pct(d.confidence)}` + (d.fallback ? " → fallback" : "") : "–";
    return [new Date(d.ts * 1000).toLocaleTimeString(), d.query === null ? "(not kept)" : d.query, category,
            (d.skills || []).join(", ") || "–", td(experts), d.k, agg, d.answered_by || "–",
            d.cost === null || d.cost === undefined ? "–" : "$" + Number(d.cost).toFixed(6),
            num(d.latency_ms, 0) + " ms", d.replica];
  }));
  // experts: summed over replicas; calls/s from the previous poll
  const sum = {};
  for (const r of replicas) {
    for (const [name, x] of Object.entries(r.experts || {})) {
      const s = sum[name] || (sum[name] = {calls: 0, errors: 0, queue: 0, lsum: 0, lcount: 0});
      s.calls += x.calls; s.errors += x.errors; s.queue += x.queue; s.lsum += x.latency_sum_s; s.lcount += x.latency_count;
    }
  }
  const now = Date.now() / 1000;
  fillRows($("experts-load"), Object.entries(sum).sort((a, b) => b[1].calls - a[1].calls).map(([name, s]) => {
    const before = lastLoad ? lastLoad.calls[name] : undefined;
    const rate = before !== undefined ? Math.max(0, s.calls - before) / Math.max(now - lastLoad.t, 1e-3) : null;
    return [name, s.calls, rate === null ? "–" : rate.toFixed(2), s.errors, s.queue,
            s.lcount ? (1000 * s.lsum / s.lcount).toFixed(0) + " ms" : "–"];
  }));
  lastLoad = {t: now, calls: Object.fromEntries(Object.entries(sum).map(([n, s]) => [n, s.calls]))};
  const backendRows = [];
  for (const r of replicas) {
    for (const [name, b] of Object.entries(r.backends || {})) {
      backendRows.push([r.replica, name, b.state, (b.adapters || []).join(", ") || "–"]);
    }
  }
  fillRows($("backends"), backendRows);
  fillRows($("batches"), (live.batches || []).map((b) => {
    const c = b.request_counts || {};
    return [b.id, b.status, `${(c.completed || 0) + (c.failed || 0)} / ${c.total || 0}`, c.failed || 0];
  }));
}

// -- why here? -------------------------------------------------------------------------------------

async function whyHere(event) {
  event.preventDefault();
  const query = $("why-query").value.trim();
  $("why-error").textContent = "";
  if (!query) { $("why-error").textContent = "Type a question first."; return; }
  let d;
  try {
    d = await api("/v1/route", {method: "POST",
      body: JSON.stringify({model: "coe", messages: [{role: "user", content: query}]})});
  } catch (e) { if (e instanceof AuthError) return logout(e.message); $("why-error").textContent = e.message; return; }
  const chosen = new Set((d.experts || []).map((e) => e.name));
  $("why-summary").replaceChildren("Answered by ", ...[...chosen].flatMap((n, i) => i ? [", ", el("b", n, "expert")] : [el("b", n, "expert")]),
    d.category ? ` · category ${d.category} (${pct(d.confidence)})` : "", d.fallback ? " · fallback to the generalist" : "",
    ` · ${d.router} router, ${num(d.latency_ms, 1)} ms`);
  bars($("why-categories"), (d.categories || []).map((c) => ({...c, highlight: c.name === d.category})),
       {max: 1, fmt: pct, empty: "this router has no level 1"});
  bars($("why-skills"), d.skill_matches || [], {fmt: (v) => num(v, 3), empty: "no skill matched"});
  bars($("why-ranking"), (d.candidates || []).map((c) => ({...c, highlight: chosen.has(c.name)})),
       {fmt: (v) => num(v, 3)});
  $("why-reason").textContent = d.reason || "";
  $("why-result").hidden = false;
}

// -- experts ------------------------------------------------------------------------------------

async function refreshRouter() {
  let r;
  try { r = await api("/v1/explorer/router"); }
  catch (e) { if (e instanceof AuthError) return logout(e.message); $("router-status").textContent = e.message; return; }
  const fit = r.fit;
  $("router-status").textContent = `${r.router} router · ${r.experts.length} experts` +
    (fit ? ` · last fit: held-out top-1 ${pct(fit.held_out_top1)} on ${fit.held_out.rows} rows, ECE ` +
      `${num(fit.ece_after)}` : " · no classifier fit") + (r.profile_source ? ` · profiles from ${r.profile_source}` : "");
  const profiles = $("profiles");
  profiles.replaceChildren();
  for (const e of r.experts) {
    const p = (r.profiles || {})[e.name];
    const box = el("div", null, "profile");
    box.dataset.expert = e.name;
    const title = el("h3", e.name);
    if (p) title.append(el("small", p.synthetic ? " synthetic profile" : ` accuracy ${pct(p.accuracy)} on ${p.answered}`));
    box.append(title, el("p", e.description || (e.categories || []).join(", "), "note"));
    const chart = el("div", null, "chart");
    box.append(chart);
    const skills = p ? Object.entries(p.skills).map(([name, score]) => ({name, score})) : [];
    skills.sort((a, b) => b.score - a.score);
    bars(chart, skills.slice(0, 12), {fmt: (v) => String(v), empty: "no skills measured", labelWidth: 160});
    profiles.append(box);
  }
  const holder = $("confusion");
  holder.replaceChildren();
  if (!fit || !fit.confusion) {
    holder.append(el("p", "No confusion matrix: the router has no classifier, or its artifact predates this " +
      "version (run `coe router fit` to make one).", "note"));
    return;
  }
  const classes = fit.classes, m = fit.confusion;
  const table = el("table", null, "confusion");
  const head = document.createElement("tr");
  head.append(el("th", "true \\ chosen"), ...classes.map((c) => el("th", c, "rot")));
  table.append(head);
  m.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    const tr = document.createElement("tr");
    tr.append(el("th", classes[i]));
    row.forEach((v, j) => {
      const cell = el("td", v || "", i === j ? "diag" : (v ? "off" : ""));
      cell.style.setProperty("--share", String(v / total));
      cell.title = `${classes[i]} → ${classes[j]}: ${v} of ${total}`;
      tr.append(cell);
    });
    table.append(tr);
  });
  holder.append(table);
}

// -- tabs and login -----------------------------------------------------------------------------

function show(tab) {
  for (const b of document.querySelectorAll("#tabs button[data-tab]")) b.classList.toggle("on", b.dataset.tab === tab);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + tab;
  clearInterval(liveTimer);
  if (tab === "live") { refreshLive(); liveTimer = setInterval(refreshLive, 2000); }
  if (tab === "experts") refreshRouter();
}

function logout(message) {
  clearInterval(liveTimer);
  sessionStorage.removeItem(KEY);
  $("app").hidden = true; $("tabs").hidden = true; $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function login(event) {
  if (event) event.preventDefault();
  const key = $("key").value;
  if (key) sessionStorage.setItem(KEY, key);
  try { await api("/v1/explorer/router"); }
  catch (e) { return logout(e instanceof AuthError ? "That key was refused: " + e.message : e.message); }
  $("key").value = "";
  $("login").hidden = true; $("app").hidden = false; $("tabs").hidden = false;
  show("live");
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("why-form").addEventListener("submit", whyHere);
  $("logout").addEventListener("click", () => logout(""));
  for (const b of document.querySelectorAll("#tabs button[data-tab]")) b.addEventListener("click", () => show(b.dataset.tab));
  if (sessionStorage.getItem(KEY) !== null) login();
});
