// The page's "In production" card (#20): per promotion, the champion's running success rate with its
// anytime-valid confidence band, the parent's rate, the rollback and confirmation lines, the decision.
// Built with textContent and inline SVG (no framework, no CDN); refreshed from /api/watch.
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const W = 280, H = 76, PAD = 4;

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }
  const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)} %`);

  function chart(p) {
    const pts = p.series || [];
    const root = svg("svg", { class: "watch-chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H,
                              "data-points": pts.length });
    const n = Math.max(1, pts.length ? pts[pts.length - 1].task : 1);
    const x = (t) => PAD + (W - 2 * PAD) * (t / n);
    const y = (r) => PAD + (H - 2 * PAD) * (1 - r);
    if (pts.length) {
      const upper = pts.map((q) => `${x(q.task).toFixed(1)},${y(q.upper).toFixed(1)}`);
      const lower = pts.slice().reverse().map((q) => `${x(q.task).toFixed(1)},${y(q.lower).toFixed(1)}`);
      const band = svg("path", { class: "band", d: `M${upper.join("L")}L${lower.join("L")}Z` });
      band.appendChild(svg("title", {})).textContent = "confidence sequence of the champion's success rate";
      root.appendChild(band);
    }
    const hline = (cls, v, what) => {
      if (v === null || v === undefined || !isFinite(v)) return;
      const l = svg("line", { class: cls, x1: PAD, x2: W - PAD, y1: y(v), y2: y(v) });
      l.appendChild(svg("title", {})).textContent = `${what}: ${pct(v)}`;
      root.appendChild(l);
    };
    hline("parent-rate", p.parent_rate, `${p.parent}'s success rate`);
    hline("rollback-line", p.rollback_below, "rolled back when the band falls below");
    hline("confirm-line", p.confirm_above, "confirmed when the band rises above");
    if (pts.length) {
      root.appendChild(svg("polyline", { class: "rate",
        points: pts.map((q) => `${x(q.task).toFixed(1)},${y(q.rate).toFixed(1)}`).join(" ") }));
    }
    if (p.at_task) root.appendChild(svg("line", { class: "decided", x1: x(p.at_task), x2: x(p.at_task), y1: PAD,
                                                   y2: H - PAD }));
    return root;
  }

  function row(p) {
    const tr = el("tr", { "data-version": p.version, "data-state": p.state, class: p.current ? "current" : null });
    tr.appendChild(el("td", { class: "mono" }, p.version + (p.current ? " ★" : "")));
    tr.appendChild(el("td", { class: "parent mono" }, `${p.parent} ${pct(p.parent_rate)} (${p.parent_tasks || 0})`));
    tr.appendChild(el("td", { class: "tasks" }, String(p.tasks || 0)));
    const rate = el("td", { class: "rate" }, pct(p.rate));
    rate.appendChild(el("div", { class: "muted small cs" }, `band ${pct(p.cs_lower)} – ${pct(p.cs_upper)}`));
    tr.appendChild(rate);
    const c = el("td", {});
    c.appendChild(chart(p));
    tr.appendChild(c);
    const label = p.state === "watching" ? `watching (${p.tasks || 0} tasks)` : p.state.replace("_", " ");
    const d = el("td", {});
    d.appendChild(el("span", { class: `decision ${p.state}`, title: p.reason }, label));
    if (p.cause && p.state !== "watching") d.appendChild(el("div", { class: "muted small" },
      `${p.cause.replace("_", " ")}${p.at_task ? ` at task ${p.at_task}` : ""}`));
    tr.appendChild(d);
    tr.appendChild(el("td", { class: "muted small" }, p.decided_at ? p.decided_at.replace("T", " ").slice(0, 19) : "–"));
    return tr;
  }

  async function load() {
    let res;
    try {
      const r = await fetch("/api/watch", { cache: "no-store" });
      if (!r.ok) return;
      res = await r.json();
    } catch (e) { return; }
    const body = document.querySelector("#watch-table tbody");
    if (!body) return;
    body.replaceChildren();
    if (!res.promotions || !res.promotions.length) {
      const tr = el("tr", { class: "empty-row" });
      tr.appendChild(el("td", { colspan: 7, class: "empty" }, "No promotion watched yet."));
      body.appendChild(tr);
      return;
    }
    for (const p of res.promotions) body.appendChild(row(p));
  }

  document.addEventListener("DOMContentLoaded", () => { load(); setInterval(load, 5000); });
})();
