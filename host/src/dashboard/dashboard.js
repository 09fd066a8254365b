// kl-proxy's live dashboard: plain JS, no libraries, charts drawn as inline SVG.
// Every text that comes from the store (token texts, prompts, plugin names) is set with
// textContent, never parsed as HTML.
"use strict";

const POLL_MS = 3000;
const SVGNS = "http://www.w3.org/2000/svg";
const params = new URLSearchParams(location.search);
let token = params.get("token") || sessionStorage.getItem("klproxy-token") || "";
const state = {
  series: params.get("series") || "",
  info: null,
  seriesAgg: null,
  openId: null,
  open: null,
  selected: null,
  timer: null,
};
window.klDashboard = state; // for tests and the curious

const $ = (id) => document.getElementById(id);
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

// ---------- numbers ----------
function fmt(v, digits) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (digits !== undefined) return v.toFixed(digits);
  if (a === 0) return "0";
  if (a >= 1000) return v.toFixed(0);
  if (a >= 100) return v.toFixed(1);
  if (a >= 1) return v.toFixed(3);
  if (a >= 0.001) return v.toFixed(4);
  return v.toExponential(2);
}
function pct(v) { return v === null || v === undefined || !isFinite(v) ? "–" : (100 * v).toFixed(2) + "%"; }
function setVal(id, value, text, pm) {
  const e = $(id);
  e.dataset.value = value === null || value === undefined ? "" : String(value);
  e.textContent = text;
  if (pm !== undefined && pm !== null) e.appendChild(el("span", { class: "pm" }, " ± " + pm));
}
function shortTime(ms) {
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}
function metricOf(name) { const i = (name || "").lastIndexOf("."); return i < 0 ? name : name.slice(i + 1); }

// ---------- API ----------
async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) { showAuth(true); throw new Error("unauthorized"); }
  if (!r.ok) {
    let msg = r.status + "";
    try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(path.split("?")[0] + ": " + msg);
  }
  return r.json();
}
function showAuth(on) {
  $("auth").hidden = !on;
  if (on) $("auth-msg").textContent = token ? "that token was refused" : "this dashboard needs the admin token";
}
function showError(e) {
  const box = $("error");
  if (!e || e.message === "unauthorized") { box.hidden = true; return; }
  box.hidden = false;
  box.textContent = e.message;
}

// ---------- headline ----------
function renderSummary(s) {
  const failed = Object.values(s.comparisons_failed || {}).reduce((a, b) => a + b, 0);
  const dropped = s.live ? s.live.dropped : s.comparisons_dropped;
  setVal("h-ok", s.comparisons_ok, String(s.comparisons_ok));
  setVal("h-failed", failed, String(failed));
  $("h-failed-note").textContent = Object.entries(s.comparisons_failed || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
  setVal("h-dropped", dropped, String(dropped));
  setVal("h-positions", s.aligned_positions, String(s.aligned_positions));
  $("h-positions-note").textContent = `aligned of ${s.positions}`;
  const cov = s.positions > 0 ? s.aligned_positions / s.positions : null;
  setVal("h-coverage", cov, pct(cov));
  const k = s.kld;
  setVal("h-kld-mean", k ? k.mean : null, k ? fmt(k.mean) : "–", k ? fmt(k.mean_err) : null);
  setVal("h-kld-median", k ? k.median : null, k ? fmt(k.median) : "–");
  setVal("h-kld-p99", k ? k.p99 : null, k ? fmt(k.p99) : "–");
  $("h-kld-source").textContent = s.sources && s.sources.kld ? s.sources.kld + (k ? `, n = ${k.n}` : "") : "";
  const st = s.same_top;
  setVal("h-same-top", st ? st[0] : null, st ? pct(st[0]) : "–", st ? pct(st[1]) : null);
  const r = s.rms_delta_p;
  setVal("h-rms-dp", r ? r[0] : null, r ? pct(r[0]) : "–", r ? pct(r[1]) : null);
  const pr = s.ppl_ratio, lr = s.ln_ppl_ratio;
  setVal("h-ppl-ratio", pr, pr !== null && pr !== undefined ? fmt(pr) : "–", pr && lr ? fmt(pr * lr[1]) : null);
}

// ---------- plugins and the series choice ----------
function renderInfo(info) {
  state.info = info;
  const ul = $("plugins");
  ul.replaceChildren();
  const names = new Set([...(info.plugins || []), ...Object.keys(info.plugin_failures || {})]);
  if (names.size === 0) ul.appendChild(el("li", { class: "muted" }, "no plugins loaded"));
  for (const name of [...names].sort()) {
    const fails = info.plugin_failures && info.plugin_failures[name] || {};
    const total = Object.values(fails).reduce((a, b) => a + b, 0);
    const li = el("li", { "data-plugin": name });
    li.appendChild(el("b", {}, name));
    if (!(info.plugins || []).includes(name)) li.appendChild(el("span", { class: "muted" }, " (not loaded)"));
    const f = el("span", { class: "fails" + (total ? " bad" : ""), "data-failures": total },
      total ? `${total} failed` : "0 failures");
    f.title = Object.entries(fails).map(([k, v]) => `${k}: ${v}`).join("\n");
    li.appendChild(f);
    ul.appendChild(li);
  }
  const sel = $("series");
  const series = info.series || [];
  if (!state.series || !series.includes(state.series)) state.series = info.default_series || series[0] || "";
  const current = [...sel.options].map((o) => o.value).join("|");
  if (current !== series.join("|")) {
    sel.replaceChildren(...series.map((n) => el("option", { value: n }, n)));
  }
  sel.value = state.series;
  for (const e of document.querySelectorAll(".sname")) e.textContent = state.series || "–";
}

// ---------- charts ----------
const W = 420, H = 210, M = { l: 44, r: 10, t: 14, b: 30 };
function frame(box) {
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  box.replaceChildren(s);
  return s;
}
function yAxis(s, ymax, fmtY) {
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    const y = H - M.b - ((H - M.t - M.b) * i) / 4;
    s.appendChild(svg("line", { class: "grid", x1: M.l, x2: W - M.r, y1: y, y2: y }));
    s.appendChild(svg("text", { x: M.l - 4, y: y + 3, "text-anchor": "end" }, fmtY(v)));
  }
  s.appendChild(svg("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }));
  s.appendChild(svg("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
}
function emptyChart(box, msg) { box.replaceChildren(el("div", { class: "empty" }, msg)); }
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
const countFmt = (v) => (v >= 1000 ? (v / 1000).toFixed(1) + "k" : String(Math.round(v)));

function drawHistogram(agg) {
  const box = $("chart-hist");
  if (!agg || !agg.n) return emptyChart(box, "no values yet");
  const bins = agg.histogram.bins;
  const below = agg.histogram.below;
  const log = agg.scale === "log";
  const slots = bins.length + (below ? 1 : 0);
  const ymax = niceMax(Math.max(below, ...bins.map((b) => b.n)));
  const s = frame(box);
  s.dataset.bins = bins.length;
  yAxis(s, ymax, countFmt);
  const pw = W - M.l - M.r, ph = H - M.t - M.b, bw = pw / slots;
  const y = (n) => H - M.b - (ph * n) / ymax;
  let x = M.l;
  if (below) {
    const r = svg("rect", { class: "bar below", x: x + 1, y: y(below), width: Math.max(1, bw - 2), height: H - M.b - y(below), "data-n": below });
    r.appendChild(svg("title", {}, `≤ ${fmt(bins[0].lo)}: ${below} positions`));
    s.appendChild(r);
    s.appendChild(svg("text", { x: x + bw / 2, y: H - M.b + 12, "text-anchor": "middle" }, "≤"));
    x += bw;
  }
  const x0 = x;
  bins.forEach((b, i) => {
    const r = svg("rect", { class: "bar", x: x0 + i * bw + 0.5, y: y(b.n), width: Math.max(1, bw - 1), height: H - M.b - y(b.n), "data-n": b.n });
    r.appendChild(svg("title", {}, `${fmt(b.lo)} – ${fmt(b.hi)}: ${b.n} positions`));
    s.appendChild(r);
  });
  // x ticks: decades on a log scale, about six ticks on a linear one.
  if (log) {
    bins.forEach((b, i) => {
      const e = Math.log10(b.lo);
      if (Math.abs(e - Math.round(e)) < 1e-6) {
        const tx = x0 + i * bw;
        s.appendChild(svg("line", { class: "axis", x1: tx, x2: tx, y1: H - M.b, y2: H - M.b + 4 }));
        s.appendChild(svg("text", { x: tx, y: H - M.b + 14, "text-anchor": "middle" }, "1e" + Math.round(e)));
      }
    });
  } else {
    const step = Math.max(1, Math.ceil(bins.length / 6));
    bins.forEach((b, i) => {
      if (i % step) return;
      s.appendChild(svg("text", { x: x0 + i * bw, y: H - M.b + 14, "text-anchor": "middle" }, fmt(b.lo)));
    });
  }
  $("hist-note").textContent = `(${agg.n} positions, ${log ? "log" : "linear"} x)`;
}

function drawBuckets(box, buckets, opts) {
  if (!buckets || !buckets.length) return emptyChart(box, "no values yet");
  const s = frame(box);
  const lo = buckets[0].lo, hi = buckets[buckets.length - 1].hi;
  const ymaxRaw = Math.max(...buckets.map((b) => b.mean + (b.err || 0)));
  const yminRaw = Math.min(0, ...buckets.map((b) => b.mean - (b.err || 0)));
  const ymax = niceMax(ymaxRaw > 0 ? ymaxRaw : 1);
  yAxis(s, ymax, (v) => fmt(v));
  const pw = W - M.l - M.r, ph = H - M.t - M.b;
  const X = (v) => M.l + (pw * (v - lo)) / Math.max(1, hi - lo);
  const Y = (v) => H - M.b - (ph * (Math.max(v, yminRaw) )) / ymax;
  s.dataset.buckets = buckets.length;
  if (opts.line) {
    const pts = buckets.map((b) => `${X((b.lo + b.hi) / 2).toFixed(1)},${Y(b.mean).toFixed(1)}`);
    s.appendChild(svg("polyline", { class: "line", points: pts.join(" ") }));
  }
  buckets.forEach((b) => {
    const x1 = X(b.lo), x2 = X(b.hi), cx = (x1 + x2) / 2;
    let shape;
    if (opts.line) {
      shape = svg("circle", { class: "dot", cx, cy: Y(b.mean), r: 3, "data-n": b.n });
    } else {
      shape = svg("rect", { class: "bar", x: x1 + 0.5, y: Y(Math.max(0, b.mean)), width: Math.max(1, x2 - x1 - 1), height: Math.abs(Y(0) - Y(b.mean)), "data-n": b.n });
    }
    shape.appendChild(svg("title", {}, `${opts.label(b.lo)} – ${opts.label(b.hi)}: mean ${fmt(b.mean)} ± ${fmt(b.err)}, ${b.n} positions`));
    s.appendChild(shape);
    if (b.err > 0) s.appendChild(svg("line", { class: "err", x1: cx, x2: cx, y1: Y(b.mean - b.err), y2: Y(b.mean + b.err) }));
    if (x2 - x1 >= 14) s.appendChild(svg("text", { class: "count", x: cx, y: M.t - 3, "text-anchor": "middle" }, countFmt(b.n)));
  });
  const ticks = 4;
  let last = null;
  for (let i = 0; i <= ticks; i++) {
    const v = lo + ((hi - lo) * i) / ticks;
    if (opts.label(v) === last) continue;
    last = opts.label(v);
    s.appendChild(svg("text", { x: X(v), y: H - M.b + 14, "text-anchor": i === 0 ? "start" : i === ticks ? "end" : "middle" }, opts.label(v)));
  }
  s.appendChild(svg("text", { x: W - M.r, y: H - 4, "text-anchor": "end" }, opts.axis));
}

function renderSeries(agg) {
  state.seriesAgg = agg;
  drawHistogram(agg);
  drawBuckets($("chart-ctx"), agg && agg.n ? agg.by_context.buckets : null, {
    label: (v) => String(Math.round(v)), axis: "tokens of context (prompt + answer)",
  });
  drawBuckets($("chart-time"), agg && agg.n ? agg.by_time.buckets : null, {
    label: shortTime, axis: "", line: true,
  });
  if (agg && agg.n) $("time-note").textContent = `(buckets of ${Math.round(agg.by_time.width_ms / 1000)} s)`;
}

// ---------- recent comparisons ----------
function renderRecent(list) {
  const tbody = document.querySelector("#recent tbody");
  tbody.replaceChildren();
  for (const c of list.comparisons) {
    const tr = el("tr", { "data-id": c.id });
    if (c.id === state.openId) tr.classList.add("selected");
    const s = c.series || {};
    tr.appendChild(el("td", {}, shortTime(c.time_ms)));
    tr.appendChild(el("td", {}, c.endpoint));
    tr.appendChild(el("td", { class: "num" }, c.positions));
    tr.appendChild(el("td", { class: "num" }, fmt(s.mean)));
    tr.appendChild(el("td", { class: "num" }, fmt(s.max)));
    tr.appendChild(el("td", { class: "num" }, s.same_top === null || s.same_top === undefined ? "–" : (100 * s.same_top).toFixed(0) + "%"));
    const st = el("td", { class: "status-" + c.status }, c.status === "ok" ? "ok" : `${c.status}${c.reason ? ": " + c.reason : ""}`);
    tr.appendChild(st);
    tr.addEventListener("click", () => { location.hash = "c=" + encodeURIComponent(c.id); });
    tbody.appendChild(tr);
  }
  if (!list.comparisons.length) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: 7, class: "muted" }, "no comparisons yet: send requests through the proxy"));
    tbody.appendChild(tr);
  }
  const first = list.comparisons.find((c) => c.status === "ok");
  const base = (m) => (m || "?").split(/[\\/]/).pop();
  $("models").textContent = first ? `main ${base(first.main_model)}  vs  candidate ${base(first.candidate_model)} (${first.strategy || "?"})` : "";
  $("models").title = first ? `${first.main_model} vs ${first.candidate_model}` : "";
}

// ---------- colour scale ----------
const SEQ = ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"];
const DIV = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"];
// Returns {edges (ascending, length colours+1, first -Infinity, last Infinity), colours}.
function colourScale(name, agg) {
  const m = metricOf(name);
  if (m.startsWith("kld")) {
    return { edges: [-Infinity, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, Infinity], colours: SEQ };
  }
  const min = agg && agg.n ? agg.min : 0, max = agg && agg.n ? agg.max : 1;
  if (min < 0) {
    const a = Math.max(Math.abs(min), Math.abs(max)) || 1;
    const f = [-0.75, -0.5, -0.25, -0.05, 0.05, 0.25, 0.5, 0.75].map((x) => +(x * a).toPrecision(3));
    return { edges: [-Infinity, ...f, Infinity], colours: DIV };
  }
  const top = max > 0 ? max : 1;
  const f = [1, 2, 3, 4, 5, 6, 7, 8].map((i) => +((top * i) / 9).toPrecision(3));
  return { edges: [-Infinity, ...f, Infinity], colours: SEQ };
}
function colourIndex(scale, v) {
  for (let i = 0; i < scale.colours.length; i++) if (v < scale.edges[i + 1]) return i;
  return scale.colours.length - 1;
}
function renderLegend(scale) {
  const box = $("legend");
  box.replaceChildren();
  scale.colours.forEach((c, i) => {
    const lo = scale.edges[i], hi = scale.edges[i + 1];
    const label = lo === -Infinity ? `< ${fmt(hi)}` : hi === Infinity ? `≥ ${fmt(lo)}` : `${fmt(lo)}–${fmt(hi)}`;
    const sw = el("span", { class: "sw", "data-lo": lo, "data-hi": hi, "data-colour": c }, label);
    sw.style.background = c;
    if (i >= 6 && scale.colours === SEQ) sw.style.color = "#fff";
    box.appendChild(sw);
  });
  box.appendChild(el("span", { class: "sw na" }, "no value"));
}

// ---------- one comparison ----------
async function openComparison(id) {
  state.openId = id;
  for (const tr of document.querySelectorAll("#recent tbody tr")) tr.classList.toggle("selected", tr.dataset.id === id);
  try {
    const one = await api("/api/comparisons/" + encodeURIComponent(id));
    if (state.openId !== id) return;
    state.open = one;
    renderComparison();
    $("detail").scrollIntoView({ behavior: "instant", block: "start" });
  } catch (e) { showError(e); }
}

function tokenText(texts, id) { return texts.has(id) ? texts.get(id) : null; }
function prob(lp) { return lp === null || lp === undefined ? null : Math.exp(lp); }

function renderComparison() {
  const one = state.open;
  if (!one) return;
  $("detail").hidden = false;
  $("d-id").textContent = one.id;
  const rec = one.record;
  const meta = [new Date(one.time_ms).toLocaleString(), one.status];
  if (one.reason) meta.push(`${one.reason}: ${one.message || ""}`);
  if (rec) meta.push(`${rec.positions.length} tokens, prompt ${rec.prompt_tokens}, ${rec.strategy}, ${rec.candidate_requests} candidate requests`);
  $("d-meta").textContent = meta.join(" · ");
  const prompt = one.request && (one.request.messages || one.request.prompt);
  $("d-prompt").hidden = !prompt;
  if (prompt) {
    $("d-prompt-text").textContent = Array.isArray(prompt)
      ? prompt.map((m) => `${m.role}: ${typeof m.content === "string" ? m.content : JSON.stringify(m.content)}`).join("\n")
      : String(prompt);
  }
  const box = $("tokens");
  box.replaceChildren();
  $("pos").replaceChildren(el("p", { class: "muted" }, "Hover or tap a token to compare the two models there."));
  if (!rec) { box.appendChild(el("p", { class: "muted" }, "no record: the comparison failed")); return; }
  const texts = new Map((rec.texts || []).map((t) => [t.id, t.text]));
  const hasText = texts.size > 0;
  box.classList.toggle("notext", !hasText);
  const scale = colourScale(state.series, state.seriesAgg);
  renderLegend(scale);
  const values = one.position_values || [];
  rec.positions.forEach((p, i) => {
    const v = values[i] && typeof values[i][state.series] === "number" ? values[i][state.series] : null;
    const span = el("span", { class: "tok", "data-i": i, "data-token": p.main.id, "data-status": p.status });
    if (hasText) {
      const t = tokenText(texts, p.main.id);
      if (t === null || t === "") { span.textContent = "·"; span.classList.add("empty"); } else span.textContent = t;
    } else {
      span.classList.add("notext");
    }
    if (v === null) span.classList.add("na");
    else {
      const ci = colourIndex(scale, v);
      span.dataset.v = String(v);
      span.dataset.colour = scale.colours[ci];
      span.style.background = scale.colours[ci];
      if (ci >= 6 && scale.colours === SEQ) span.style.color = "#fff";
    }
    if (p.status === "aligned" && p.candidate_pick !== null && p.candidate_pick !== undefined && p.candidate_pick !== p.main.id) {
      span.classList.add("diverge");
    }
    span.title = `#${i}  ${state.series}: ${v === null ? "–" : fmt(v)}`;
    span.addEventListener("mouseenter", () => { if (state.selected === null) showPosition(i); });
    span.addEventListener("click", () => {
      state.selected = state.selected === i ? null : i;
      for (const s of box.querySelectorAll(".tok.sel")) s.classList.remove("sel");
      if (state.selected !== null) span.classList.add("sel");
      showPosition(i);
    });
    box.appendChild(span);
  });
  if (state.selected !== null && state.selected < rec.positions.length) {
    box.children[state.selected].classList.add("sel");
    showPosition(state.selected);
  }
}

function showPosition(i) {
  const one = state.open;
  const rec = one.record;
  const p = rec.positions[i];
  const texts = new Map((rec.texts || []).map((t) => [t.id, t.text]));
  const name = (id) => {
    if (id === null || id === undefined) return "–";
    const t = texts.get(id);
    return t === undefined ? `#${id}` : JSON.stringify(t);
  };
  const pos = $("pos");
  pos.replaceChildren();
  pos.dataset.i = i;
  pos.appendChild(el("h3", {}, `position ${i} (context ${rec.prompt_tokens + i}) · ${p.status}`));
  const dl = el("dl", { class: "facts" });
  const fact = (k, v, cls, key) => {
    dl.appendChild(el("dt", {}, k));
    const dd = el("dd", cls ? { class: cls } : {}, v);
    if (key) dd.dataset.k = key;
    dl.appendChild(dd);
    return dd;
  };
  const pm = prob(p.main.logprob), pc = prob(p.candidate);
  fact("main emitted", `${name(p.main.id)}  p = ${fmt(pm, 4)}`, null, "main");
  const differs = p.candidate_pick !== null && p.candidate_pick !== undefined && p.candidate_pick !== p.main.id;
  fact("candidate's pick", `${name(p.candidate_pick)}${differs ? "  (differs)" : "  (same)"}`, differs ? "diff" : "same", "pick");
  fact("candidate p", pc === null ? "–" : fmt(pc, 4), null, "pc");
  const dd = fact("Δp", pc === null ? "–" : (pc - pm >= 0 ? "+" : "") + (pc - pm).toFixed(4), null, "dp");
  if (pc !== null) dd.dataset.value = String(pc - pm);
  const vals = (one.position_values || [])[i] || {};
  for (const [k, v] of Object.entries(vals)) fact(k, fmt(v), null, "v:" + k);
  pos.appendChild(dl);
  const side = el("div", { class: "side" });
  const list = (title, top, cls) => {
    const wrap = el("div", { class: cls });
    const table = el("table");
    const head = el("tr");
    head.appendChild(el("th", {}, title));
    head.appendChild(el("th", { class: "num" }, "p"));
    table.appendChild(head);
    for (const t of top || []) {
      const tr = el("tr", { "data-token": t.id });
      if (t.id === p.main.id) tr.classList.add("is-main");
      if (cls === "cand" && t.id === p.candidate_pick) tr.classList.add("is-pick");
      tr.appendChild(el("td", { class: "t" }, name(t.id)));
      const td = el("td", { class: "num" });
      const bar = el("span", { class: "pbar" });
      bar.style.width = Math.round(40 * Math.exp(t.logprob)) + "px";
      td.appendChild(bar);
      td.appendChild(document.createTextNode(Math.exp(t.logprob).toFixed(3)));
      tr.appendChild(td);
      table.appendChild(tr);
    }
    if (!top || !top.length) {
      const tr = el("tr");
      tr.appendChild(el("td", { colspan: 2, class: "muted" }, "none"));
      table.appendChild(tr);
    }
    wrap.appendChild(table);
    return wrap;
  };
  side.appendChild(list("main", p.main_top, "main"));
  side.appendChild(list("candidate", p.candidate_top, "cand"));
  pos.appendChild(side);
}

// ---------- the loop ----------
async function refresh() {
  const q = state.series ? "&series=" + encodeURIComponent(state.series) : "";
  try {
    const [summary, info] = await Promise.all([api("/api/summary"), api("/api/info")]);
    showAuth(false);
    renderSummary(summary);
    renderInfo(info);
    const q2 = state.series ? "&series=" + encodeURIComponent(state.series) : q;
    const [list, agg] = await Promise.all([
      api("/api/comparisons?limit=50" + q2),
      state.series ? api("/api/series?name=" + encodeURIComponent(state.series)) : Promise.resolve(null),
    ]);
    renderRecent(list);
    renderSeries(agg);
    showError(null);
    $("live").classList.remove("stale");
    $("updated").textContent = "updated " + shortTime(Date.now());
    document.body.dataset.loaded = String((+document.body.dataset.loaded || 0) + 1);
  } catch (e) {
    $("live").classList.add("stale");
    showError(e);
  }
}

function route() {
  const m = /^#c=(.+)$/.exec(location.hash);
  if (m) {
    const id = decodeURIComponent(m[1]);
    if (id !== state.openId) { state.selected = null; openComparison(id); }
  } else {
    state.openId = null; state.open = null; $("detail").hidden = true;
  }
}

function start() {
  if (token) sessionStorage.setItem("klproxy-token", token);
  // Keep the token out of the address bar (and history) once it is read.
  if (params.has("token")) {
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("auth-token").value;
    sessionStorage.setItem("klproxy-token", token);
    refresh();
  });
  $("series").addEventListener("change", async (ev) => {
    state.series = ev.target.value;
    for (const e of document.querySelectorAll(".sname")) e.textContent = state.series;
    await refresh();
    renderComparison();
  });
  $("d-close").addEventListener("click", () => { history.replaceState(null, "", location.pathname + location.search); route(); });
  window.addEventListener("hashchange", route);
  refresh().then(route);
  state.timer = setInterval(refresh, POLL_MS);
}
document.addEventListener("DOMContentLoaded", start);
