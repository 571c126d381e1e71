// The Academy page. No framework, no CDN: DOM built with textContent (event data is untrusted), charts
// in inline SVG, live updates from /api/events (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "academy-token";

const state = {
  status: null,
  clockSkewMs: 0,          // server now - browser now (the daemon's clock drives the policy)
  chartRun: null,          // the run whose loss the chart shows
  chartPinned: false,      // the user picked a run: do not follow the active one
  points: [],
  datasets: [],
  models: null,
  canAct: false,
};

// ------------------------------------------------------------------ helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

function fmtDuration(sec) {
  if (sec === null || sec === undefined || !isFinite(sec)) return "–";
  sec = Math.max(0, Math.round(sec));
  const d = Math.floor(sec / 86400), hh = Math.floor((sec % 86400) / 3600);
  const m = Math.floor((sec % 3600) / 60), ss = sec % 60;
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${m}m`;
  if (m) return `${m}m ${ss}s`;
  return `${ss}s`;
}

function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function toast(msg, bad = false) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "toast" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.add("hidden"), bad ? 9000 : 4000);
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function act(url, body) {
  const headers = { "Content-Type": "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(url, { method: "POST", headers, body: JSON.stringify(body || {}) });
  let data = {};
  try { data = await r.json(); } catch (e) { /* not JSON: keep the status */ }
  if (r.status === 401) {
    localStorage.removeItem(TOKEN_KEY);
    renderAuth();
  }
  return { ok: r.ok, status: r.status, data };
}

function confirmDialog(title, text) {
  return new Promise((resolve) => {
    const dlg = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-reason").value = "from the page";
    dlg.returnValue = "";
    dlg.addEventListener("close", () => {
      resolve(dlg.returnValue === "ok" ? ($("confirm-reason").value || "from the page") : null);
    }, { once: true });
    dlg.showModal();
  });
}

// ------------------------------------------------------------------ status: next training, current run

// What the follower last reported (model.deployed / model.deploy_failed), beside the champion (#19).
function renderServed(served, champ, generation) {
  const pill = $("served-pill");
  if (!served) {
    pill.textContent = "served: not reported yet";
    pill.className = "pill warn";
    pill.title = "no model.deployed / model.deploy_failed from the follower since the daemon started";
    return;
  }
  const behind = (served.serving || null) !== champ || (served.generation || 0) < generation;
  pill.textContent = "served: " + (served.serving || "base model") +
    (served.generation ? ` (gen ${served.generation})` : "") + (behind ? " · behind the champion" : "");
  pill.className = "pill" + (behind ? " warn" : " good");
  pill.title = served.outcome === "model.deploy_failed"
    ? `${served.version || "base model"} not deployed: ${served.reason}${served.reason_code ? " " + served.reason_code : ""}: ${served.detail || ""}`
    : `on ${served.target} ${served.runtime || ""}`;
}

function renderStatus(st) {
  state.status = st;
  state.clockSkewMs = new Date(st.now).getTime() - Date.now();
  $("version").textContent = "v" + st.version;
  $("nats").textContent = "NATS " + (st.nats_url || "–");
  const champ = typeof st.champion === "object" && st.champion ? st.champion.version : st.champion;
  if (champ !== undefined || state.models) {
    const c = champ || (state.models && state.models.champion) || null;
    $("champion-pill").textContent = "champion: " + (c || "base model");
    $("champion-pill").className = "pill" + (c ? " good" : "");
  }
  if (st.served !== undefined) renderServed(st.served, champ || null, st.champion_generation || 0);

  const base = st.base_model;
  if (base && typeof base === "object") {
    $("base-pill").textContent = `base: ${base.name} · sha256 ${String(base.sha256).slice(0, 12)}`;
    $("base-pill").title = `${base.kind} ${base.path}\nsha256 ${base.sha256}`;
  } else {
    $("base-pill").textContent = "base: not resolved (this daemon does not train)";
  }

  const th = st.threshold || {};
  const have = th.new_successful_lessons || 0, need = th.min_lessons || 1;
  const big = $("lessons-big");
  big.replaceChildren(`${have} / ${need}`, h("small", {}, "new successful lessons"));
  const fill = $("lessons-fill");
  fill.style.width = Math.min(100, (100 * have) / need) + "%";
  fill.className = "fill" + (have >= need ? "" : " part");

  const facts = $("next-facts");
  facts.replaceChildren(
    h("dt", {}, "interval"), h("dd", { id: "eligible" }, ""),
    h("dt", {}, "last training"), h("dd", {}, th.last_training_ended ? fmtTime(th.last_training_ended) : "never"),
    h("dt", {}, "quiet hours"), h("dd", {}, th.quiet_hours ? `${th.quiet_hours} UTC` : "none"),
    ...(th.consecutive_failures ? [h("dt", {}, "failures in a row"), h("dd", {}, th.consecutive_failures)] : []),
  );
  tickCountdown();
  renderParked(st.outbox_parked);

  const d = st.decision || {};
  const why = $("policy-why");
  why.textContent = (d.train ? "Will train: " : "Waiting: ") + (d.reason || "");
  why.className = "why" + (d.train ? " go" : "");

  renderRun(st);
}

function tickCountdown() {
  const st = state.status;
  const el = $("eligible");
  if (!st || !el) return;
  const now = Date.now() + state.clockSkewMs;
  const at = st.next_eligible ? new Date(st.next_eligible).getTime() : now;
  el.textContent = at > now + 500
    ? `eligible in ${fmtDuration((at - now) / 1000)} (${fmtTime(st.next_eligible)})`
    : `ok (min ${st.threshold ? st.threshold.min_interval_h : "?"} h since the last training)`;
}

function renderRun(st) {
  const run = st.active_run;
  $("run-state").textContent = run ? run.state : "";
  $("run-state").className = "state " + (run ? run.state : "");
  $("run-none").classList.toggle("hidden", !!run);
  $("run-live").classList.toggle("hidden", !run);
  if (run) {
    $("run-id").textContent = `${run.run_id} · ${run.reason}`;
    renderKpis(st.live || lastPoint(run.run_id));
    if (!state.chartPinned && state.chartRun !== run.run_id) showChart(run.run_id);
  }
  const last = st.last_run;
  const box = $("last-run");
  box.replaceChildren();
  if (last && (!run || last.run_id !== run.run_id)) {
    box.append(
      h("dt", {}, "last run"), h("dd", {}, h("span", { class: "state " + last.state }, last.state), " ",
        h("span", { class: "mono" }, last.run_id)),
      h("dt", {}, "ended"), h("dd", {}, fmtTime(last.ended_at)),
    );
    if (last.error) box.append(h("dt", {}, "why"), h("dd", {}, last.error));
    if (last.version) box.append(h("dt", {}, "version"), h("dd", {}, last.version));
  }
}

function lastPoint(runId) {
  return state.chartRun === runId && state.points.length ? state.points[state.points.length - 1] : null;
}

function renderKpis(p) {
  p = p || {};
  const total = p.total_steps;
  $("k-step").textContent = p.step !== undefined ? (total ? `${p.step}/${total}` : p.step) : "–";
  $("k-epoch").textContent = fmtNum(p.epoch, 3);
  $("k-loss").textContent = fmtNum(p.loss);
  $("k-tps").textContent = p.tokens_per_s ? Math.round(p.tokens_per_s).toLocaleString() : "–";
  $("k-eta").textContent = p.eta_s !== undefined && p.eta_s !== null ? fmtDuration(p.eta_s) : "–";
  $("run-fill").style.width = total ? Math.min(100, (100 * (p.step || 0)) / total) + "%" : "0%";
}

// ------------------------------------------------------------------ the loss chart (inline SVG)

async function showChart(runId, pinned = false) {
  state.chartRun = runId;
  state.chartPinned = pinned;
  state.points = [];
  $("chart-title").textContent = runId || "";
  document.querySelectorAll("#runs-table tbody tr").forEach((tr) =>
    tr.classList.toggle("selected", tr.dataset.run === runId));
  drawChart();
  if (!runId) return;
  try {
    const res = await getJSON(`/api/runs/${encodeURIComponent(runId)}/loss`);
    if (state.chartRun !== runId) return;
    // Live points may have arrived while loading: keep whichever list knows more.
    if (res.points.length >= state.points.length) state.points = res.points;
    drawChart();
  } catch (e) { /* a run without a curve: the chart says so */ }
}

function addPoint(runId, p) {
  if (state.chartRun !== runId) return;
  const last = state.points[state.points.length - 1];
  if (last && last.step === p.step && last.loss === p.loss) return;
  state.points.push(p);
  if (!drawChart.pending) {
    drawChart.pending = true;
    requestAnimationFrame(() => { drawChart.pending = false; drawChart(); });
  }
}

function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((x) => raw <= x);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(10)));
  return out;
}

function drawChart() {
  const box = $("chart");
  const pts = state.points.filter((p) => typeof p.step === "number");
  const lossPts = pts.filter((p) => typeof p.loss === "number" && isFinite(p.loss));
  const evalPts = pts.filter((p) => typeof p.eval_loss === "number" && isFinite(p.eval_loss));
  const lrPts = pts.filter((p) => typeof p.learning_rate === "number");
  box.dataset.points = String(lossPts.length);
  box.replaceChildren();
  if (!lossPts.length && !evalPts.length) {
    box.append(h("div", { class: "empty" }, state.chartRun
      ? "No loss points yet for this run." : "No training yet: the chart fills in as soon as a run reports progress."));
    return;
  }
  const W = box.clientWidth || 800, H = box.clientHeight || 300;
  const m = { l: 56, r: 56, t: 12, b: 28 };
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "training loss" });
  const all = lossPts.concat(evalPts);
  const maxStep = Math.max(...pts.map((p) => p.step), 1), minStep = Math.min(...pts.map((p) => p.step), 0);
  const lossVals = all.flatMap((p) => [p.loss, p.eval_loss]).filter((v) => typeof v === "number" && isFinite(v));
  let lo = Math.min(...lossVals), hi = Math.max(...lossVals);
  if (hi === lo) { hi += 0.5; lo = Math.max(0, lo - 0.5); }
  const pad = (hi - lo) * 0.08;
  lo = Math.max(0, lo - pad); hi += pad;
  const x = scale(minStep, maxStep, m.l, W - m.r), y = scale(lo, hi, H - m.b, m.t);

  for (const t of ticks(lo, hi, 5)) {
    svg.append(s("line", { class: "grid-line", x1: m.l, x2: W - m.r, y1: y(t), y2: y(t) }));
    const lab = s("text", { class: "axis-label", x: m.l - 8, y: y(t) + 4, "text-anchor": "end" });
    lab.textContent = fmtNum(t, 3);
    svg.append(lab);
  }
  for (const t of ticks(minStep, maxStep, Math.max(2, Math.floor(W / 110)))) {
    if (t !== Math.round(t)) continue;
    const lab = s("text", { class: "axis-label", x: x(t), y: H - 8, "text-anchor": "middle" });
    lab.textContent = t;
    svg.append(lab);
  }
  if (lrPts.length) {
    const lrMax = Math.max(...lrPts.map((p) => p.learning_rate)) || 1;
    const yl = scale(0, lrMax * 1.08, H - m.b, m.t);
    svg.append(s("path", { class: "lr-line", d: lrPts.map((p, i) => `${i ? "L" : "M"}${x(p.step)},${yl(p.learning_rate)}`).join("") }));
    for (const t of [0, lrMax / 2, lrMax]) {
      const lab = s("text", { class: "axis-label", x: W - m.r + 8, y: yl(t) + 4, "text-anchor": "start" });
      lab.textContent = fmtNum(t, 2);
      svg.append(lab);
    }
  }
  if (lossPts.length) {
    const line = lossPts.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join("");
    const area = `${line}L${x(lossPts[lossPts.length - 1].step).toFixed(1)},${H - m.b}L${x(lossPts[0].step).toFixed(1)},${H - m.b}Z`;
    svg.append(s("path", { class: "loss-area", d: area }));
    svg.append(s("path", { class: "loss-line", d: line }));
  }
  for (const p of evalPts) svg.append(s("circle", { class: "eval-dot", cx: x(p.step), cy: y(p.eval_loss), r: 4 }));

  // Hover: the nearest point's numbers.
  const cursor = s("line", { class: "cursor hidden", y1: m.t, y2: H - m.b });
  const dot = s("circle", { class: "cursor-dot hidden", r: 4 });
  svg.append(cursor, dot);
  const tip = h("div", { class: "tip hidden" });
  svg.addEventListener("mousemove", (ev) => {
    const rect = svg.getBoundingClientRect();
    const mx = ((ev.clientX - rect.left) / rect.width) * W;
    const src = lossPts.length ? lossPts : evalPts;
    let best = src[0];
    for (const p of src) if (Math.abs(x(p.step) - mx) < Math.abs(x(best.step) - mx)) best = p;
    const val = typeof best.loss === "number" ? best.loss : best.eval_loss;
    cursor.setAttribute("x1", x(best.step)); cursor.setAttribute("x2", x(best.step));
    dot.setAttribute("cx", x(best.step)); dot.setAttribute("cy", y(val));
    cursor.classList.remove("hidden"); dot.classList.remove("hidden"); tip.classList.remove("hidden");
    tip.textContent = `step ${best.step}  loss ${fmtNum(best.loss)}` +
      (best.learning_rate !== undefined ? `  lr ${fmtNum(best.learning_rate, 3)}` : "") +
      (best.eval_loss !== undefined ? `  held-out ${fmtNum(best.eval_loss)}` : "");
    const px = (x(best.step) / W) * rect.width;
    tip.style.left = Math.min(px + 12, rect.width - 260) + "px";
    tip.style.top = "8px";
  });
  svg.addEventListener("mouseleave", () => {
    cursor.classList.add("hidden"); dot.classList.add("hidden"); tip.classList.add("hidden");
  });
  box.append(svg, tip);
}

// ------------------------------------------------------------------ runs

function sparkline(points) {
  const vals = points.filter((p) => typeof p.loss === "number" && isFinite(p.loss));
  const svg = s("svg", { class: "spark", viewBox: "0 0 110 26", preserveAspectRatio: "none" });
  if (vals.length < 2) return svg;
  const lo = Math.min(...vals.map((p) => p.loss)), hi = Math.max(...vals.map((p) => p.loss));
  const x = scale(vals[0].step, vals[vals.length - 1].step, 1, 109), y = scale(lo, hi, 24, 2);
  svg.append(s("path", { d: vals.map((p, i) => `${i ? "L" : "M"}${x(p.step)},${y(p.loss)}`).join("") }));
  return svg;
}

async function loadRuns() {
  const { runs } = await getJSON("/api/runs?limit=12");
  const body = $("runs-table").querySelector("tbody");
  body.replaceChildren();
  if (!runs.length) {
    body.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No runs yet.")));
    return;
  }
  for (const r of runs) {
    const sparkCell = h("td", {}, r.has_loss ? "…" : "–");
    const tr = h("tr", { class: "clickable" + (r.run_id === state.chartRun ? " selected" : ""), "data-run": r.run_id,
      onclick: () => showChart(r.run_id, true) },
    h("td", { class: "mono" }, r.run_id),
    h("td", {}, h("span", { class: "state " + r.state }, r.state)),
    h("td", {}, r.error ? `${r.reason} — ${r.error}` : r.reason),
    h("td", {}, fmtTime(r.requested_at)),
    h("td", {}, fmtDuration(r.duration_s)),
    h("td", {}, r.version || "–"),
    sparkCell);
    body.append(tr);
    if (r.has_loss) {
      getJSON(`/api/runs/${encodeURIComponent(r.run_id)}/loss`)
        .then((res) => sparkCell.replaceChildren(sparkline(res.points)))
        .catch(() => sparkCell.replaceChildren("–"));
    }
  }
  if (!state.chartRun && !state.chartPinned) showChart(runs.find((r) => r.has_loss)?.run_id || null);
}

// ------------------------------------------------------------------ datasets

function hbars(entries, cls) {
  const max = Math.max(1, ...entries.map(([, v]) => v));
  const grid = h("div", { class: "hbars " + (cls || "") });
  for (const [k, v] of entries) {
    const bar = h("i");
    bar.style.width = (100 * v) / max + "%";
    grid.append(h("span", {}, k), h("div", { class: "track" }, bar), h("b", {}, v.toLocaleString()));
  }
  return grid;
}

function histogram(hist) {
  const box = h("div", { class: "hist" });
  const train = hist.train || [], held = hist.heldout || [];
  const max = Math.max(1, ...train, ...held);
  hist.bins.forEach((lo, i) => {
    const next = hist.bins[i + 1];
    const a = h("i", { title: `train ${train[i] || 0}` }), b = h("i", { class: "h", title: `held-out ${held[i] || 0}` });
    a.style.height = (100 * (train[i] || 0)) / max + "%";
    b.style.height = (100 * (held[i] || 0)) / max + "%";
    box.append(h("div", { class: "col" }, h("div", { class: "pair" }, a, b),
      h("span", {}, next === undefined ? `${lo}+` : `<${next}`)));
  });
  return box;
}

function renderDataset(d) {
  const body = $("dataset-body");
  body.replaceChildren();
  if (!d) { body.append(h("div", { class: "empty" }, "No dataset yet.")); return; }
  body.append(h("div", { class: "stats" },
    h("div", { class: "stat" }, h("span", {}, "train"), h("b", {}, (d.examples || 0).toLocaleString())),
    h("div", { class: "stat" }, h("span", {}, "of them restated"), h("b", {}, (d.restatements || 0).toLocaleString())),
    h("div", { class: "stat" }, h("span", {}, "held-out"), h("b", {}, (d.heldout || 0).toLocaleString())),
    h("div", { class: "stat" }, h("span", {}, "replay"), h("b", {}, (d.replay || 0).toLocaleString())),
    h("div", { class: "stat" }, h("span", {}, "dropped"),
      h("b", {}, Object.values(d.dropped || {}).reduce((a, b) => a + b, 0).toLocaleString())),
    h("div", { class: "stat" }, h("span", {}, "format"), h("b", {}, d.format)),
  ));
  if (d.refused) body.append(h("div", { class: "refused" }, "Refused: " + d.refused));
  const counts = Object.entries(d.counts || {}).map(([src, c]) => [src, typeof c === "object" ? (c.train || 0) + (c.heldout || 0) : c]);
  body.append(h("div", { class: "sub" }, "examples per source (train + held-out)"), hbars(counts));
  const dropped = Object.entries(d.dropped || {}).sort((a, b) => b[1] - a[1]);
  body.append(h("div", { class: "sub" }, "dropped, by reason"),
    dropped.length ? hbars(dropped, "drop") : h("div", { class: "muted small" }, "nothing dropped"));
  const lh = d.length_histogram;
  if (lh && (lh.train || lh.heldout)) {
    body.append(h("div", { class: "sub" }, `length (${lh.unit}) — `, h("span", { class: "sw loss" }), " train ",
      h("span", { class: "sw eval" }), " held-out"), histogram(lh));
  }
  body.append(h("div", { class: "muted small mono" }, `${d.dataset_id} · ${fmtTime(d.created_at)}`));
}

async function loadDatasets() {
  const res = await getJSON("/api/datasets?limit=8");
  state.datasets = res.datasets;
  const sel = $("dataset-select");
  const keep = sel.value;
  sel.replaceChildren(...res.datasets.map((d) => h("option", { value: d.dataset_id }, `${fmtTime(d.created_at)}${d.refused ? " (refused)" : ""}`)));
  sel.classList.toggle("hidden", res.datasets.length < 2);
  if (keep && res.datasets.some((d) => d.dataset_id === keep)) sel.value = keep;
  renderDataset(res.datasets.find((d) => d.dataset_id === sel.value) || res.datasets[0]);
  if (!res.available) $("dataset-body").replaceChildren(h("div", { class: "empty" }, "No dataset yet (the curator has not run)."));
}

// ------------------------------------------------------------------ models: the genealogy

function metricLine(m) {
  // The arena's numbers: held-out loss and perplexity of the candidate (vs the champion it met).
  const met = m.metrics || {};
  const held = met.heldout || {};
  const parts = [];
  if (typeof held.candidate_loss === "number") {
    parts.push(`held-out loss ${fmtNum(held.candidate_loss)}` +
      (typeof held.champion_loss === "number" ? ` vs ${fmtNum(held.champion_loss)}` : ""));
  }
  if (typeof held.candidate_perplexity === "number") parts.push(`ppl ${fmtNum(held.candidate_perplexity)}`);
  if (typeof held.improvement === "number") parts.push(`Δ ${fmtNum(held.improvement, 3)}`);
  if (!parts.length) {
    for (const [k, v] of Object.entries(met)) if (typeof v === "number" && parts.length < 3) parts.push(`${k} ${fmtNum(v)}`);
  }
  return parts.join(" · ");
}

function renderModels(res) {
  state.models = res;
  const body = $("models-body");
  body.replaceChildren();
  const champ = res.champion || null;
  $("champion-pill").textContent = "champion: " + (champ || "base model");
  $("champion-pill").className = "pill" + (champ ? " good" : "");
  if (!res.available) { body.append(h("div", { class: "empty" }, "The model registry is not part of this build yet.")); return; }
  if (!res.models.length) { body.append(h("div", { class: "empty" }, "No versions yet: the base model serves.")); return; }
  const byVersion = new Map(res.models.map((m) => [m.version, m]));
  const children = new Map();
  const roots = [];
  for (const m of res.models) {
    const parent = m.parent ?? m.parent_version ?? null;
    if (parent && byVersion.has(parent)) {
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(m);
    } else roots.push(m);
  }
  const num = (v) => parseInt(String(v.version).replace(/\D/g, ""), 10) || 0;
  const node = (m) => {
    const isChamp = m.version === champ || m.is_champion === true;
    const verdict = m.verdict && typeof m.verdict === "object" ? m.verdict.verdict : (m.verdict || null);
    const reasons = m.verdict && Array.isArray(m.verdict.reasons) ? m.verdict.reasons.join("\n") : "";
    const st = m.status || null;
    const promote = h("button", { class: "tiny", "data-version": m.version, disabled: isChamp || !state.canAct || null,
      title: state.canAct ? "make this version the champion" : "read-only: set a token to act",
      onclick: () => promote_(m.version) }, "Promote");
    const li = h("li", { "data-version": m.version },
      h("div", { class: "node" + (isChamp ? " champion" : "") + (st ? " " + st : ""), title: reasons || null },
        h("div", {},
          h("span", { class: "v" }, m.version), " ",
          isChamp ? h("span", { class: "crown" }, "★ champion") : null, " ",
          verdict ? h("span", { class: "state " + verdict, title: reasons || null }, "arena: " + verdict) : null, " ",
          st && !isChamp && !(st === "rejected" && verdict === "reject") ? h("span", { class: "state " + st }, st) : null,
          h("div", { class: "meta" }, [m.created_at ? fmtTime(m.created_at) : null, m.run_id, m.dataset_id]
            .filter(Boolean).join(" · ")),
          h("div", { class: "metrics" }, metricLine(m))),
        isChamp ? null : promote));
    const kids = (children.get(m.version) || []).sort((a, b) => num(a) - num(b));
    if (kids.length) li.append(h("ul", {}, kids.map(node)));
    return li;
  };
  roots.sort((a, b) => num(a) - num(b));
  body.append(h("ul", { class: "tree", id: "genealogy" }, h("li", {}, h("div", { class: "node" },
    h("div", {}, h("span", { class: "v" }, "base"), " ", champ ? null : h("span", { class: "crown" }, "★ serving"),
      h("div", { class: "meta" }, "the base model"))), h("ul", {}, roots.map(node)))));
}

async function loadModels() {
  renderModels(await getJSON("/api/models"));
}

async function promote_(version) {
  const reason = await confirmDialog(`Promote ${version}?`,
    `Venom will be told to hot-swap to ${version} (model.promoted). You can roll back afterwards.`);
  if (reason === null) return;
  const r = await act(`/api/models/${encodeURIComponent(version)}/promote`, { reason });
  report(r, `${version} promoted`);
  refreshSoon();
}

async function rollback_() {
  const reason = await confirmDialog("Roll back the champion?",
    "The previous champion (or the base model) serves again (model.rolled_back).");
  if (reason === null) return;
  const r = await act("/api/rollback", { reason });
  report(r, "rolled back");
  refreshSoon();
}

async function train_() {
  const force = $("force").checked;
  const reason = await confirmDialog(force ? "Train now, skipping the thresholds?" : "Train now?",
    force ? "A run starts unless one is already active." : "The policy decides: a run starts only if it allows.");
  if (reason === null) return;
  const r = await act("/api/train", { force, reason });
  report(r, r.data.run_id ? `started ${r.data.run_id}` : "started");
  refreshSoon();
}

function report(r, okText) {
  if (r.ok) toast(okText);
  else toast(r.data.error || r.data.reason || `refused (HTTP ${r.status})`, true);
}

// ------------------------------------------------------------------ parked outbox rows

function renderParked(rows) {
  rows = rows || [];
  $("outbox-card").hidden = rows.length === 0;
  $("outbox-table").querySelector("tbody").replaceChildren(...rows.map((r) => h("tr", {},
    h("td", {}, fmtTime(r.parked_at)), h("td", { class: "mono" }, r.subject), h("td", { class: "mono" }, r.msg_id),
    h("td", {}, String(r.attempts)), h("td", { class: "excerpt", title: r.last_error || "" }, r.last_error || ""))));
}

// ------------------------------------------------------------------ DLQ

async function loadDlq() {
  const res = await getJSON("/api/dlq?limit=25");
  $("dlq-count").textContent = res.count ? `${res.count} in total` : "";
  $("dlq-reasons").replaceChildren(...Object.entries(res.by_reason).sort((a, b) => b[1] - a[1])
    .map(([k, v]) => h("span", { class: "chip" }, `${k} ${v}`)));
  const body = $("dlq-table").querySelector("tbody");
  body.replaceChildren();
  if (!res.recent.length) {
    body.append(h("tr", {}, h("td", { colspan: 5, class: "empty" }, "Nothing rejected. Every event fit the contract.")));
    return;
  }
  for (const d of res.recent) {
    body.append(h("tr", {},
      h("td", {}, fmtTime(d.at)), h("td", { class: "mono" }, d.subject),
      h("td", {}, h("span", { class: "chip" }, d.reason)), h("td", {}, d.detail || ""),
      h("td", { class: "excerpt", title: d.excerpt || "" }, d.excerpt || "")));
  }
}

// ------------------------------------------------------------------ auth

function renderAuth() {
  const st = state.status;
  if (!st) return;
  const mode = st.page ? st.page.state_changes : "disabled";
  const hasToken = !!localStorage.getItem(TOKEN_KEY);
  state.canAct = mode === "token" && hasToken;
  $("token-form").classList.toggle("hidden", mode !== "token" || hasToken);
  $("readonly-pill").classList.toggle("hidden", state.canAct);
  $("readonly-pill").textContent = mode === "token" ? "locked: type the token" : "read-only";
  const banner = $("banner");
  banner.classList.toggle("hidden", mode !== "disabled");
  if (mode === "disabled") banner.textContent = "Read-only: " + (st.page.hint || "no token configured");
  for (const b of [$("train-btn"), $("rollback-btn")]) {
    b.disabled = !state.canAct;
    b.title = state.canAct ? "" : (mode === "token" ? "type the token first" : "read-only: set ACADEMY_HTTP__TOKEN");
  }
  document.querySelectorAll("#models-body button[data-version]").forEach((b) => {
    const champ = state.models && state.models.champion === b.dataset.version;
    b.disabled = champ || !state.canAct;
  });
}

// ------------------------------------------------------------------ loading and the live feed

async function loadStatus() {
  renderStatus(await getJSON("/api/status"));
  renderAuth();
}

async function refreshAll() {
  const jobs = [loadStatus(), loadRuns(), loadDatasets(), loadModels(), loadDlq()];
  const results = await Promise.allSettled(jobs);
  for (const r of results) if (r.status === "rejected") console.warn("refresh:", r.reason && r.reason.message);
  renderAuth();
}

function refreshSoon(which) {
  const want = refreshSoon.want || (refreshSoon.want = new Set());
  (which || ["status", "runs", "datasets", "models", "dlq"]).forEach((w) => want.add(w));
  clearTimeout(refreshSoon.timer);
  refreshSoon.timer = setTimeout(() => {
    const todo = [...want];
    want.clear();
    const map = { status: loadStatus, runs: loadRuns, datasets: loadDatasets, models: loadModels, dlq: loadDlq };
    Promise.allSettled(todo.map((w) => map[w]())).then(renderAuth);
  }, 300);
}

function connect() {
  const live = $("live");
  const es = new EventSource("/api/events");
  es.onopen = () => { live.className = "live on"; live.querySelector("b").textContent = "live"; };
  es.onerror = () => { live.className = "live off"; live.querySelector("b").textContent = "reconnecting"; };
  es.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    const subj = msg.subject, d = msg.data || {};
    if (subj === "academy.training.progress") {
      const active = state.status && state.status.active_run;
      if (!state.chartPinned && state.chartRun !== d.run_id) {
        state.chartRun = d.run_id; state.points = []; $("chart-title").textContent = d.run_id;
      }
      addPoint(d.run_id, d);
      if (active && active.run_id === d.run_id) renderKpis(d);
      else refreshSoon(["status"]);
    } else if (subj === "ingest") {
      refreshSoon(d.rejected ? ["status", "dlq"] : ["status"]);
    } else if (subj.startsWith("academy.dlq.")) {
      refreshSoon(["status", "dlq"]);
    } else if (subj.startsWith("academy.dataset.")) {
      refreshSoon(["status", "datasets"]);
    } else {
      refreshSoon();  // training started/finished, evaluation, promotion, rollback
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = $("token-input").value.trim();
    if (!v) return;
    localStorage.setItem(TOKEN_KEY, v);
    $("token-input").value = "";
    renderAuth();
    renderModels(state.models || { available: false, models: [] });
    renderAuth();
    toast("token saved in this browser");
  });
  $("train-btn").addEventListener("click", train_);
  $("rollback-btn").addEventListener("click", rollback_);
  $("dataset-select").addEventListener("change", () =>
    renderDataset(state.datasets.find((d) => d.dataset_id === $("dataset-select").value)));
  window.addEventListener("resize", () => drawChart());
  setInterval(tickCountdown, 1000);
  setInterval(() => refreshSoon(["status"]), 15000);
  refreshAll().then(connect);
});
