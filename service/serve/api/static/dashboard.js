// ctp dashboard: polls GET /status, draws tiles, curves (inline SVG) and the version table, and
// drives the try-it panel (POST /classify, POST /retrieve, GET /gallery/{id}/image).
// No libraries, no build step. Text from the API goes into the DOM as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const isNum = (x) => typeof x === "number" && Number.isFinite(x);
const fmt = (x, digits = 3) => (isNum(x) ? x.toFixed(digits) : "–");
const count = (x) => (isNum(x) ? x.toLocaleString("en-US") : "–");

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

function ago(t) {
  if (!isNum(t)) return "";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

// ---- charts -----------------------------------------------------------------------------------

// Evenly spaced round ticks covering [lo, hi]: a step of 1, 2, 2.5 or 5 x 10^k, about n of them.
function niceTicks(lo, hi, n = 4) {
  const raw = (hi - lo || 1) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw - 1e-12);
  const start = Math.floor(lo / step + 1e-9) * step, end = Math.ceil(hi / step - 1e-9) * step;
  const ticks = [];
  for (let i = 0; start + i * step <= end + step / 1e6; i++) ticks.push(start + i * step);
  const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9) + (step / mag === 2.5 ? 1 : 0));
  return { ticks, digits, lo: start, hi: end };
}

// series: [{key, name, cls, points: [[x, y|null], ...], line, dots}]; x from 1 to xMax (chunks
// counted from 1, as in ctp's plots); y ticks evenly spaced round values
function lineChart({ kind, series, xMax, yMin: lo, yMax: hi, yLabel }) {
  const { ticks, digits, lo: yMin, hi: yMax } = niceTicks(lo, hi);
  const W = 320, H = 180, L = 36, R = 10, T = 10, B = 24;
  const sx = (x) => L + (xMax <= 1 ? (W - L - R) / 2 : ((x - 1) / (xMax - 1)) * (W - L - R));
  const sy = (y) => T + (1 - (y - yMin) / (yMax - yMin || 1)) * (H - T - B);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", "data-chart": kind, role: "img",
                              "aria-label": `${yLabel} after each chunk` });
  ticks.forEach((y, i) => {
    svg.append(el("svg:line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: i ? "grid" : "axis",
                                "data-tick": y.toFixed(digits) }));
    svg.append(el("svg:text", { x: L - 4, y: sy(y) + 3, "text-anchor": "end" }, y.toFixed(digits)));
  });
  const step = Math.max(1, Math.ceil(xMax / 8));
  for (let x = 1; x <= xMax; x += step) {
    svg.append(el("svg:text", { x: sx(x), y: H - 8, "text-anchor": "middle" }, x));
  }
  svg.append(el("svg:text", { x: W - R, y: H - 8, "text-anchor": "end" }, xMax > 1 ? "" : "chunk"));
  series.forEach((s) => {
    const pts = s.points.filter(([, y]) => isNum(y));
    if (s.line) {
      let d = "", pen = false;
      for (const [x, y] of s.points) {
        if (!isNum(y)) { pen = false; continue; }
        d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
        pen = true;
      }
      if (d) svg.append(el("svg:path", { d, class: `line ${s.cls}`, "data-series": s.key }));
    }
    if (s.dots) {
      for (const [x, y, label] of pts) {
        const c = el("svg:circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: s.line ? 2.8 : 4,
                                     class: `pt ${s.cls}`, "data-series": s.key, "data-x": x, "data-y": y });
        c.append(el("svg:title", {}, `${label || `after chunk ${x}`}: ${s.name} ${fmt(y)}`));
        svg.append(c);
      }
    }
  });
  return svg;
}

function legend(items) {
  return el("div", { class: "legend" }, ...items.map(([k, name]) => el("span", {}, el("i", { class: `k${k}` }), name)));
}

function renderCurves(curves, versionMetrics) {
  const box = $("curves");
  const sets = Object.entries((curves && curves.sets) || {});
  const names = new Set([...sets.map(([n]) => n), ...Object.keys(versionMetrics || {})]);
  box.replaceChildren();
  if (!names.size) {
    box.append(el("p", { class: "muted" }, "no eval metrics yet"));
    setText("curves-note", "");
    return;
  }
  setText("curves-note", curves && curves.version != null
    ? `eval history up to version ${curves.version}, ${curves.chunks} chunk${curves.chunks === 1 ? "" : "s"}` : "");
  for (const name of [...names].sort()) {
    const c = (curves.sets || {})[name] || { kind: "?", score: "score", after_chunk: [], avg_accuracy: [], forgetting: [] };
    const perVersion = (versionMetrics || {})[name] || [];
    const n = c.after_chunk.length;
    const xs = c.chunk || [];
    const xMax = Math.max(n, ...xs.filter(isNum), ...perVersion.map((p) => (isNum(p.chunks) ? p.chunks : 0)), 1);
    const at = (arr) => arr.map((y, i) => [isNum(xs[i]) ? xs[i] : i + 1, y]);
    const acc = lineChart({
      kind: "accuracy", xMax, yMin: 0, yMax: 1, yLabel: c.score,
      series: [
        { key: "score", name: c.score, cls: "s0", points: at(c.after_chunk), line: true, dots: true },
        { key: "avg_accuracy", name: "avg accuracy", cls: "s1", points: at(c.avg_accuracy), line: true, dots: false },
      ],
    });
    const fv = perVersion.filter((p) => isNum(p.chunks) && isNum(p.forgetting))
      .map((p) => [p.chunks, p.forgetting, `version ${p.version} (${p.chunks} chunks)`]);
    const ys = [...c.forgetting.filter(isNum), ...fv.map((p) => p[1])];
    const fgt = lineChart({
      kind: "forgetting", xMax, yMin: Math.min(0, ...ys), yMax: Math.max(0.05, ...ys), yLabel: "forgetting",
      series: [
        { key: "forgetting", name: "forgetting", cls: "s2", points: at(c.forgetting), line: true, dots: true },
        { key: "version", name: "forgetting", cls: "s3", points: fv, line: false, dots: true },
      ],
    });
    const last = (arr) => [...arr].reverse().find(isNum);
    box.append(el("div", { class: "chart-card", "data-set": name },
      el("h3", {}, name, el("span", { class: "muted" },
        `${c.kind} · ${c.score} ${fmt(last(c.after_chunk))} · forgetting ${fmt(last(c.forgetting))}`)),
      el("div", { class: "chart-pair" },
        el("div", {}, el("div", { class: "chart-title" }, `${c.score} after each chunk`), acc,
           legend([[0, c.score], [1, "avg accuracy (seen chunks)"]])),
        el("div", {}, el("div", { class: "chart-title" }, "forgetting"), fgt,
           legend([[2, "after each chunk"], [3, "per version (registry)"]])))));
  }
}

function renderHistory(versions, servedVersion) {
  const body = $("history").tBodies[0];
  body.replaceChildren();
  for (const v of [...(versions || [])].reverse()) {
    const metrics = Object.entries(v.metrics || {}).filter(([, m]) => m && typeof m === "object")
      .map(([name, m]) => {
        const key = "acc1" in m ? "acc1" : "mean_recall@1";
        return `${name}: ${key} ${fmt(m[key])} · avg ${fmt(m.avg_accuracy)} · fgt ${fmt(m.forgetting)}`;
      });
    const created = isNum(v.created) ? new Date(v.created * 1000).toLocaleString() : "–";
    body.append(el("tr", { class: String(v.version) === String(servedVersion) ? "current" : "", "data-version": v.version },
      el("td", {}, `v${v.version}`), el("td", { title: ago(v.created) }, created), el("td", {}, v.chunks ?? "–"),
      el("td", {}, v.strategy ?? "–"), el("td", {}, metrics.join("  |  ") || "–")));
  }
  if (!body.rows.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no versions yet")));
}

// ---- status polling -----------------------------------------------------------------------------

const rates = [];  // recent ingest rates for the sparkline
let lastCurves = "";
let lastHistory = "";

function renderSpark(values) {
  const svg = $("rate-spark");
  svg.replaceChildren();
  const v = values.filter(isNum);
  if (v.length < 2) return;
  const max = Math.max(...v, 1e-9);
  const d = v.map((y, i) => `${i ? "L" : "M"}${((i / (v.length - 1)) * 200).toFixed(1)},${(38 - (y / max) * 36).toFixed(1)}`).join("");
  svg.append(el("svg:path", { d }));
}

function render(s) {
  const notes = [
    ...Object.entries(s.errors || {}).map(([part, e]) => `${part} unavailable: ${e}`),
    ...Object.entries(s.health || {}).map(
      ([role, h]) => `${role} paused: ${h.reason} (retrying in ${h.retry_in} s)`,
    ),
    ...(s.disk && s.disk.low
      ? [`disk low: ${(s.disk.free_bytes / 2 ** 30).toFixed(1)} GiB free on ${s.disk.path}, writes paused`]
      : []),
  ];
  const banner = $("errors");
  banner.replaceChildren(...notes.map((text) => el("div", {}, text)));
  banner.hidden = !notes.length;

  const sv = s.serving;
  setText("version", sv ? String(sv.model_version) : "–");
  setText("serving-detail", sv ? `${sv.model ?? ""} · ${sv.strategy ?? "?"} · ${sv.chunks ?? "?"} chunks · gallery ${count(sv.gallery_size)} (${sv.index})` : "no model loaded yet");

  if (s.ingest) {
    const r = s.ingest.rate_per_s;
    setText("ingest-rate", isNum(r) ? r.toFixed(r < 10 ? 2 : 0) : "…");
    setText("ingest-lag", count(s.ingest.lag));
    setText("ingest-detail", `${count(s.ingest.produced)} produced on ${s.ingest.topic}`);
    const dl = s.ingest.dead_letters;
    if (dl) {
      setText("dlq-count", count(dl.count + dl.fallback));
      setText("dlq-detail", `on ${dl.topic}` + (dl.fallback ? ` (${count(dl.fallback)} kept in Redis)` : ""));
      $("dlq-last").replaceChildren(...dl.last.map((d) =>
        el("li", { title: d.source ?? "" }, `${d.error ?? "?"}: ${d.reason ?? ""}`)));
    }
    rates.push(r);
    if (rates.length > 60) rates.shift();
    renderSpark(rates);
  } else {
    const why = s.ingest_pending ? "checking…" : "unavailable";
    setText("ingest-rate", "–");
    setText("ingest-lag", "–");
    setText("ingest-detail", `Kafka ${why}`);
  }
  if (s.chunks) {
    setText("chunks-pending", count(s.chunks.pending));
    setText("chunks-detail", `${count(s.chunks.enqueued)} enqueued · ${count(s.chunks.dead)} set aside`);
  }
  if (s.memory) {
    setText("memory-items", count(s.memory.items));
    setText("memory-detail", `of ${count(s.memory.capacity)} pairs · ${(s.memory.bytes / 1e6).toFixed(1)} MB`);
  }
  setText("latest-version", s.latest != null ? String(s.latest) : "–");
  setText("latest-detail", `${(s.versions || []).length} versions kept`);

  const curvesKey = JSON.stringify([s.curves, s.version_metrics]);
  if (curvesKey !== lastCurves) {
    lastCurves = curvesKey;
    renderCurves(s.curves, s.version_metrics);
  }
  const historyKey = JSON.stringify([s.versions, sv && sv.model_version]);
  if (historyKey !== lastHistory) {
    lastHistory = historyKey;
    renderHistory(s.versions, sv && sv.model_version);
  }
  setText("updated", `updated ${new Date((s.time || Date.now() / 1000) * 1000).toLocaleTimeString()}`);
  document.body.dataset.loaded = "1";
}

async function poll() {
  try {
    const r = await fetch("/status", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    render(await r.json());
  } catch (e) {
    setText("updated", `status unavailable (${e.message}); retrying`);
  } finally {
    setTimeout(poll, document.hidden ? POLL_MS * 5 : POLL_MS);
  }
}

// ---- try it ------------------------------------------------------------------------------------

async function apiError(r) {
  try {
    const body = await r.json();
    return `${r.status} ${body.error}: ${body.reason}`;
  } catch {
    return `HTTP ${r.status}`;
  }
}

function busy(button, on) {
  button.disabled = on;
}

$("classify-file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  const img = $("classify-preview");
  if (img.src) URL.revokeObjectURL(img.src);
  if (file) { img.src = URL.createObjectURL(file); img.hidden = false; } else { img.hidden = true; }
});

$("classify-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("classify-file").files[0];
  const labels = $("classify-labels").value.split(",").map((x) => x.trim()).filter(Boolean);
  const out = $("classify-results");
  setText("classify-error", "");
  if (!file || !labels.length) { setText("classify-error", "choose an image and give at least one label"); return; }
  const form = new FormData();
  form.append("file", file, file.name);
  for (const label of labels) form.append("labels", label);
  busy($("classify-btn"), true);
  try {
    const r = await fetch("/classify", { method: "POST", body: form });
    if (!r.ok) { out.replaceChildren(); setText("classify-error", await apiError(r)); return; }
    const body = await r.json();
    out.dataset.modelVersion = body.model_version;
    out.replaceChildren(...body.predictions.map((p) => {
      const bar = el("span");
      bar.style.width = `${(p.score * 100).toFixed(1)}%`;
      return el("li", { "data-label": p.label, "data-score": p.score },
        el("span", { class: "label" }, p.label), el("span", { class: "bar" }, bar),
        el("span", { class: "score" }, fmt(p.score)));
    }));
  } catch (e) {
    setText("classify-error", `request failed: ${e.message}`);
  } finally {
    busy($("classify-btn"), false);
  }
});

$("retrieve-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("retrieve-text").value.trim();
  const k = Math.max(1, parseInt($("retrieve-k").value, 10) || 8);
  const out = $("retrieve-results");
  setText("retrieve-error", "");
  if (!text) { setText("retrieve-error", "type a text to search for"); return; }
  busy($("retrieve-btn"), true);
  try {
    const r = await fetch("/retrieve", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify({ text, k }) });
    if (!r.ok) { out.replaceChildren(); setText("retrieve-error", await apiError(r)); return; }
    const body = await r.json();
    setText("retrieve-meta", `version ${body.model_version} · gallery of ${count(body.gallery_size)}`);
    out.replaceChildren(...body.results.map((x) => el("li", { "data-id": x.id, "data-score": x.score },
      el("img", { src: `/gallery/${encodeURIComponent(x.id)}/image`, alt: x.text }),
      el("div", {}, x.text), el("div", { class: "score" }, `${fmt(x.score)} · ${x.id}`))));
    if (!body.results.length) setText("retrieve-error", "the gallery is empty");
  } catch (e) {
    setText("retrieve-error", `request failed: ${e.message}`);
  } finally {
    busy($("retrieve-btn"), false);
  }
});

poll();
