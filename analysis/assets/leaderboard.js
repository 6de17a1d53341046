"use strict";
// Data from the Python side: columns (role key|metric|run, direction max|min|null) and one object per run.
const D = JSON.parse(document.getElementById("leaderboard-data").textContent);
const KEYS = D.columns.filter(c => c.role === "key").map(c => c.name);
const METRICS = D.columns.filter(c => c.role === "metric").map(c => c.name);
const DIRECTION = Object.fromEntries(D.columns.map(c => [c.name, c.direction]));
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];
const COLOURS = new Map();  // colour per method in order of first appearance, stable under filtering
for (const r of D.rows) if (!COLOURS.has(r[D.colour])) COLOURS.set(r[D.colour], PALETTE[COLOURS.size % 10]);
const state = {view: "configs", filter: "", sort: null, desc: false, x: D.axes.x, y: D.axes.y, sel: {}};
const $ = id => document.getElementById(id);
const isNum = v => typeof v === "number" && Number.isFinite(v);
let current = {columns: [], rows: []};

// ---------------------------------------------------------------- aggregation (seeds -> configuration)
function mean(v) { return v.reduce((a, b) => a + b, 0) / v.length; }
function std(v) { const m = mean(v); return Math.sqrt(v.reduce((a, b) => a + (b - m) ** 2, 0) / (v.length - 1)); }

function aggregate(runs) {
  const ok = D.status ? runs.filter(r => r[D.status] === "success") : runs;
  const groups = new Map();
  for (const r of ok) {
    const key = JSON.stringify(KEYS.map(c => r[c]));
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  return [...groups.values()].map(summarise);
}

function summarise(runs) {
  const row = {n: runs.length};
  for (const c of KEYS) row[c] = runs[0][c];
  for (const m of METRICS) {
    const v = runs.map(r => r[m]).filter(isNum);
    row[m] = v.length ? mean(v) : null;
    row[m + "_std"] = v.length > 1 ? std(v) : null;
  }
  return row;
}

function viewColumns() {
  if (state.view === "runs") return D.columns.map(c => c.name);
  return [...KEYS, "n", ...METRICS];
}

// ---------------------------------------------------------------- formatting, filtering, sorting
function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  for (const [unit, s] of [[1e9, "G"], [1e6, "M"], [1e4, "k"]]) {
    if (a >= unit) return +(v / (s === "k" ? 1e3 : unit)).toPrecision(3) + s;
  }
  return Number.isInteger(v) ? String(v) : String(+v.toPrecision(3));
}

function cellText(row, col) {
  const std = row[col + "_std"];
  return state.view === "configs" && METRICS.includes(col) && isNum(std) ? `${fmt(row[col])} ± ${fmt(+std.toPrecision(2))}`
    : fmt(row[col]);
}

function matches(row, columns, terms) {
  return terms.every(term => {
    const i = term.indexOf(":");
    const col = i > 0 ? term.slice(0, i) : null;
    if (col !== null && columns.includes(col)) {
      return String(row[col] ?? "").toLowerCase().includes(term.slice(i + 1)) ||
             cellText(row, col).toLowerCase().includes(term.slice(i + 1));
    }
    return columns.some(c => String(row[c] ?? "").toLowerCase().includes(term) ||
                             cellText(row, c).toLowerCase().includes(term));
  });
}

function selectedRuns() {
  return D.rows.filter(r => Object.entries(state.sel).every(([c, v]) => v === "all" || String(r[c]) === v));
}

function compare(a, b) {
  const na = a === null || a === undefined, nb = b === null || b === undefined;
  if (na || nb) return na - nb;  // missing values last in both directions (handled by caller)
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, {numeric: true, sensitivity: "base"});
}

function sortRows(rows) {
  if (!state.sort) return rows;
  const s = state.sort, sign = state.desc ? -1 : 1;
  return rows.map((r, i) => [r, i]).sort(([a, i], [b, j]) => {
    const missing = (a[s] == null) - (b[s] == null);
    return missing || sign * compare(a[s], b[s]) || i - j;  // stable: ties keep their order
  }).map(([r]) => r);
}

function visibleRows() {
  const base = selectedRuns();
  const rows = state.view === "runs" ? base : aggregate(base);
  const columns = viewColumns();
  const terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
  return {columns: columns.filter(c => rows.some(r => r[c] != null)), rows: sortRows(rows.filter(r => matches(r, columns, terms)))};
}

// ---------------------------------------------------------------- rendering
function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function svgEl(tag, attrs = {}, text = "") {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function renderTable() {
  const head = el("tr");
  for (const c of current.columns) {
    const th = el("th", {"data-col": c}, c);
    if (state.sort === c) th.className = state.desc ? "desc" : "asc";
    th.addEventListener("click", () => { state.desc = state.sort === c && !state.desc; state.sort = c; update(); });
    head.append(th);
  }
  document.querySelector("#board thead").replaceChildren(head);
  const body = current.rows.map(r => {
    const tr = el("tr", {class: "row"});
    for (const c of current.columns) {
      const numeric = typeof r[c] === "number";
      tr.append(el("td", numeric ? {class: "num", "data-col": c, "data-v": r[c]} : {"data-col": c}, cellText(r, c)));
    }
    return tr;
  });
  $("rows").replaceChildren(...body);
  const total = state.view === "runs" ? D.rows.length : aggregate(D.rows).length;
  $("count").textContent = `${current.rows.length} of ${total} ${state.view === "runs" ? "runs" : "configurations"}`;
}

function scale(values, lo, hi) {
  const min = Math.min(...values), max = Math.max(...values);
  const log = min > 0 && max / min > 100;
  const f = log ? Math.log10 : v => v;
  let a = f(min), b = f(max);
  if (a === b) { const d = Math.abs(a) * 0.1 || 1; a -= d; b += d; }
  const pad = (b - a) * 0.05;
  a -= pad; b += pad;
  const map = v => lo + (f(v) - a) / (b - a) * (hi - lo);
  return {map, log, ticks: ticks(a, b, log)};
}

function ticks(a, b, log) {
  if (log) {
    const out = [];
    for (let e = Math.ceil(a); e <= Math.floor(b); e++) out.push(10 ** e);
    return out.length >= 2 ? out : [10 ** a, 10 ** b].map(v => +v.toPrecision(2));
  }
  const raw = (b - a) / 5, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = [];
  for (let v = Math.ceil(a / step) * step; v <= b; v += step) out.push(+v.toPrecision(12));
  return out;
}

function paretoFront(points) {
  const dx = DIRECTION[state.x] === "min" ? 1 : -1, dy = DIRECTION[state.y] === "min" ? 1 : -1;
  return points.filter(p => !points.some(q => dx * q.x <= dx * p.x && dy * q.y <= dy * p.y &&
                                              (dx * q.x < dx * p.x || dy * q.y < dy * p.y)));
}

function renderScatter() {
  const W = 760, H = 400, L = 70, R = 20, T = 15, B = 45;
  const svg = svgEl("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, id: "plot"});
  const points = current.rows.filter(r => isNum(r[state.x]) && isNum(r[state.y]))
    .map(r => ({x: r[state.x], y: r[state.y], row: r}));
  $("scatter").replaceChildren(svg);
  if (!points.length) { svg.append(svgEl("text", {x: L, y: H / 2}, "no rows with both values")); return; }
  const sx = scale(points.map(p => p.x), L, W - R), sy = scale(points.map(p => p.y), H - B, T);
  for (const t of sx.ticks) {
    svg.append(svgEl("line", {class: "grid", x1: sx.map(t), x2: sx.map(t), y1: T, y2: H - B}));
    svg.append(svgEl("text", {x: sx.map(t), y: H - B + 16, "text-anchor": "middle"}, fmt(t)));
  }
  for (const t of sy.ticks) {
    svg.append(svgEl("line", {class: "grid", x1: L, x2: W - R, y1: sy.map(t), y2: sy.map(t)}));
    svg.append(svgEl("text", {x: L - 6, y: sy.map(t) + 4, "text-anchor": "end"}, fmt(t)));
  }
  svg.append(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  svg.append(svgEl("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  svg.append(svgEl("text", {x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle"}, axisTitle(state.x, sx.log)));
  svg.append(svgEl("text", {x: 14, y: (T + H - B) / 2, "text-anchor": "middle",
                            transform: `rotate(-90 14 ${(T + H - B) / 2})`}, axisTitle(state.y, sy.log)));
  const directed = DIRECTION[state.x] && DIRECTION[state.y];
  const front = directed ? new Set(paretoFront(points)) : new Set();
  if (directed) {
    const line = [...front].sort((p, q) => p.x - q.x).map(p => `${sx.map(p.x)},${sy.map(p.y)}`).join(" ");
    svg.append(svgEl("polyline", {class: "pareto", points: line}));
  }
  for (const p of points) {
    const c = svgEl("circle", {class: front.has(p) ? "pt front" : "pt", cx: sx.map(p.x), cy: sy.map(p.y), r: 4.5,
                               fill: COLOURS.get(p.row[D.colour]), "fill-opacity": 0.8});
    c.append(svgEl("title", {}, KEYS.map(k => `${k}: ${fmt(p.row[k])}`).join("\n") +
                                `\n${state.x}: ${fmt(p.x)}\n${state.y}: ${fmt(p.y)}`));
    svg.append(c);
  }
  $("front-note").textContent = directed
    ? `Pareto front (dashed, outlined points): ${front.size} of ${points.length} points`
    : `no Pareto front: no better direction for ${[state.x, state.y].filter(m => !DIRECTION[m]).join(", ")}`;
  renderLegend(points);
}

function axisTitle(m, log) {
  const dir = {max: "higher is better", min: "lower is better"}[DIRECTION[m]] || "no direction";
  return `${m} (${dir}${log ? ", log scale" : ""})`;
}

function renderLegend(points) {
  const seen = new Map();
  for (const p of points) seen.set(p.row[D.colour], p.row[D.label] ?? p.row[D.colour]);
  $("legend").replaceChildren(...[...COLOURS.keys()].filter(m => seen.has(m)).map(m => {
    const s = el("span", {class: "key"}, String(seen.get(m)));
    const dot = el("i");
    dot.style.background = COLOURS.get(m);
    s.prepend(dot);
    return s;
  }));
}

// ---------------------------------------------------------------- controls, URL hash, CSV
function buildControls() {
  for (const c of D.filters) {
    const values = [...new Set(D.rows.filter(r => r[c] != null).map(r => String(r[c])))].sort(compare);
    const s = el("select", {id: `f-${c}`, "data-col": c});
    s.append(el("option", {value: "all"}, `${c}: all`), ...values.map(v => el("option", {value: v}, v)));
    s.addEventListener("change", () => { state.sel[c] = s.value; update(); });
    $("selects").append(s);
  }
  for (const axis of ["x", "y"]) {
    $(axis).append(...METRICS.map(m => el("option", {value: m}, m)));
    $(axis).addEventListener("change", () => { state[axis] = $(axis).value; update(); });
  }
  $("filter").addEventListener("input", () => { state.filter = $("filter").value; update(); });
  $("view").addEventListener("change", () => { state.view = $("view").checked ? "runs" : "configs"; update(); });
  $("csv").addEventListener("click", downloadCsv);
  for (const f of D.figures) {
    const fig = el("figure");
    fig.append(el("img", {src: f.src, alt: f.caption}), el("figcaption", {}, f.caption));
    $("figures").append(fig);
  }
}

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  state.view = p.get("view") === "runs" ? "runs" : "configs";
  state.filter = p.get("filter") || "";
  const sort = p.get("sort") || "";
  state.desc = sort.startsWith("-");
  state.sort = sort.replace(/^-/, "") || null;
  for (const axis of ["x", "y"]) if (METRICS.includes(p.get(axis))) state[axis] = p.get(axis);
  for (const c of D.filters) state.sel[c] = p.get(c) || "all";
}

function writeHash() {
  const p = new URLSearchParams();
  if (state.view === "runs") p.set("view", "runs");
  if (state.filter) p.set("filter", state.filter);
  if (state.sort) p.set("sort", (state.desc ? "-" : "") + state.sort);
  p.set("x", state.x);
  p.set("y", state.y);
  for (const [c, v] of Object.entries(state.sel)) if (v !== "all") p.set(c, v);
  try { history.replaceState(null, "", "#" + p); } catch (e) { /* some file:// settings forbid it */ }
}

function syncControls() {
  $("filter").value = state.filter;
  $("view").checked = state.view === "runs";
  $("x").value = state.x;
  $("y").value = state.y;
  for (const c of D.filters) $(`f-${c}`).value = state.sel[c];
}

function csvField(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function downloadCsv() {
  const cols = current.columns.flatMap(c => state.view === "configs" && METRICS.includes(c) ? [c, c + "_std"] : [c]);
  const lines = [cols, ...current.rows.map(r => cols.map(c => r[c]))].map(l => l.map(csvField).join(","));
  const url = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], {type: "text/csv"}));
  const a = el("a", {href: url, download: `leaderboard-${state.view}.csv`});
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function update() {
  current = visibleRows();
  renderTable();
  renderScatter();
  writeHash();
}

buildControls();
readHash();
syncControls();
update();
window.addEventListener("hashchange", () => { readHash(); syncControls(); update(); });
console.log(`leaderboard: ${current.rows.length} rows`);
