// medfed dashboard: polls api/state and draws the run; in a static page (report.html), draws
// the charts from the data embedded in it. Every value from the run folder (site names,
// causes, log lines) is peer input: it is written with textContent only.
(function () {
  "use strict";

  const POLL_MS = 2000;
  const SLOW_POLL_MS = 10000; // once the run is complete or gone
  const token = new URLSearchParams(location.search).get("token") || "";
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
  const CONSORTIUM = {all: "#000000", median: "#666666"};
  const ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
  const DASH = {federated: [], local: [6, 4], finetuned: [2, 3], personalized: [8, 3, 2, 3], centralized: [1, 3],
                zero_filled: [4, 4]};

  let version = "";
  let clockOffset = 0; // server clock minus this browser's, in seconds
  let snap = null;
  let chosenCurve = null;
  const hidden = {site: new Set(), arm: new Set()};
  const charts = {};

  const $ = (id) => document.getElementById(id);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function now() {
    return Date.now() / 1000 + clockOffset;
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    return Number(v).toFixed(digits === undefined ? 4 : digits);
  }

  function fmtBytes(n) {
    if (n === null || n === undefined || !isFinite(n) || n < 0) return "–";
    if (n < 1000) return Math.round(n) + " B";
    const units = ["kB", "MB", "GB", "TB"];
    let i = -1;
    do { n /= 1000; i++; } while (n >= 1000 && i < units.length - 1);
    return n.toFixed(1) + " " + units[i];
  }

  function fmtDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + Math.round(s - 60 * m) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function fmtAgo(t) {
    if (t === null || t === undefined) return "–";
    return fmtDuration(Math.max(0, now() - t)) + " ago";
  }

  function fmtTime(t) {
    if (t === null || t === undefined) return "–";
    return new Date(t * 1000).toLocaleString();
  }

  function banner(text) {
    const b = $("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  // ------------------------------------------------------------------ polling

  async function poll() {
    let delay = POLL_MS;
    try {
      const r = await fetch("api/state?since=" + encodeURIComponent(version),
                            {headers: {"X-Medfed-Token": token}, cache: "no-store"});
      if (r.status === 403) {
        banner("The dashboard refused this page's token: open the address that `medfed dashboard` printed.");
        return; // a wrong token stays wrong
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const data = await r.json();
      banner(null);
      clockOffset = data.server_time - Date.now() / 1000;
      if (!data.unchanged) {
        version = data.version;
        snap = data;
        render(data);
      }
      tick();
      const state = snap && snap.status ? snap.status.state : "";
      if (state === "complete" || state === "gone") delay = SLOW_POLL_MS;
    } catch (e) {
      banner("Cannot reach the dashboard server (" + e.message + "); retrying.");
    }
    setTimeout(poll, delay);
  }

  // the times shown as "ago" move on between snapshots
  function tick() {
    document.querySelectorAll("[data-when]").forEach(function (node) {
      const t = parseFloat(node.getAttribute("data-when"));
      node.textContent = isFinite(t) ? fmtAgo(t) : "–";
    });
    if (snap) renderTiming(snap);
  }

  // ------------------------------------------------------------------ rendering

  function render(s) {
    renderHeader(s);
    renderProgress(s);
    renderSites(s);
    renderCharts(s);
    renderAudit(s);
    renderLog(s);
    const problems = $("problems");
    clear(problems);
    (s.problems || []).forEach(function (p) { problems.appendChild(el("li", p)); });
    $("folder").textContent = s.folder || "";
    const updated = $("updated");
    updated.setAttribute("data-when", String(s.server_time));
  }

  function renderCharts(s) {
    renderCurves(s);
    renderPrivacy(s);
    renderBytes(s);
  }

  function renderHeader(s) {
    const job = s.job || {};
    $("job-name").textContent = "medfed run: " + (job.name || "(job not written yet)");
    document.title = "medfed: " + (job.name || "run") + " (" + s.status.state + ")";
    const badge = $("status");
    badge.textContent = s.status.state;
    badge.className = "badge " + s.status.state;
    $("status-text").textContent = s.status.text;
    const meta = $("job-meta");
    clear(meta);
    const rows = [
      ["job hash", job.hash || "known once the job is loaded", "mono"],
      ["mode", s.mode],
      ["algorithm", job.algorithm],
      ["task", job.task ? job.task + (job.monitor ? " (monitor: " + job.monitor + ")" : "") : null],
      ["model", job.model],
      ["sites", job.sites ? job.sites.length + (job.held_out && job.held_out.length ?
        " (" + job.held_out.length + " held out)" : "") : null],
      ["compare", job.compare && job.compare.length ? job.compare.join(", ") : null],
      ["last write", null, null, s.status.last_write],
    ];
    rows.forEach(function (r) {
      if ((r[1] === null || r[1] === undefined) && r[3] === undefined) return;
      const tr = el("tr");
      tr.appendChild(el("td", r[0]));
      const td = el("td", r[1], r[2]);
      if (r[3] !== undefined) {
        td.setAttribute("data-when", String(r[3]));
        td.textContent = fmtAgo(r[3]);
      }
      if (r[0] === "job hash") td.id = "job-hash";
      tr.appendChild(td);
      meta.appendChild(tr);
    });
    $("job-yaml").textContent = job.yaml || "";
  }

  function renderProgress(s) {
    const p = s.progress || {};
    $("round-counter").textContent = p.round ? String(p.round) : "0";
    $("round-total").textContent = p.total ? String(p.total) : "?";
    let state = "";
    if (s.status.state === "complete") state = "(complete)";
    else if (p.in_round) state = "(in progress; " + (p.done || 0) + " done)";
    else if (p.round) state = "(" + (p.done || 0) + " done)";
    else state = "(not started)";
    $("round-state").textContent = state;
    const bar = $("round-bar");
    bar.max = p.total || 1;
    bar.value = Math.min(p.done || 0, p.total || 1);
    const arms = (p.arms || []).filter(function (a) { return a.arm !== "federated"; })
      .map(function (a) { return a.arm + ": round " + a.round + (p.total ? " of " + p.total : ""); });
    $("arms").textContent = (arms.length ? "Other arms: " + arms.join(" · ") + ". " : "") +
      (p.stopped_early ? "Training stopped early: " + p.stopped_early : "");
  }

  function renderTiming(s) {
    const p = s.progress || {};
    const timing = p.timing || [];
    const secs = timing.map(function (t) { return t.seconds; }).filter(function (x) { return x !== null; });
    const parts = [];
    if (secs.length) {
      const mean = secs.reduce(function (a, b) { return a + b; }, 0) / secs.length;
      parts.push("last round " + fmtDuration(secs[secs.length - 1]) + ", mean " + fmtDuration(mean) +
                 " over " + secs.length + " round" + (secs.length === 1 ? "" : "s"));
      if (s.status.state === "running" && p.total && p.done < p.total) {
        parts.push("about " + fmtDuration(mean * (p.total - p.done)) + " left for the federated rounds");
      }
    }
    const open = timing.length ? timing[timing.length - 1] : null;
    if (open && open.started && open.done === null && s.status.state === "running") {
      parts.push("round " + open.round + " running for " + fmtDuration(Math.max(0, now() - open.started)));
    }
    if (p.first_event) {
      const end = s.status.state === "running" ? now() : (s.status.last_write || now());
      parts.push("started " + fmtTime(p.first_event) + ", " + fmtDuration(Math.max(0, end - p.first_event)) +
                 (s.status.state === "running" ? " ago" : " in all"));
    }
    $("timing").textContent = parts.join("; ");
  }

  function renderSites(s) {
    const body = $("sites").tBodies[0];
    clear(body);
    (s.sites || []).forEach(function (site) {
      const cls = site.state.replace(/ /g, "-");
      const tr = el("tr", null, "state-row-" + cls);
      tr.setAttribute("data-site", site.name);
      tr.setAttribute("data-state", site.state);
      const name = el("td", site.name);
      if (site.held_out) name.appendChild(el("span", " (held out)", "note"));
      tr.appendChild(name);
      tr.appendChild(el("td", site.state, "state state-" + cls));
      tr.appendChild(el("td", site.round ? site.arm + " " + site.round : "–"));
      const seen = el("td", fmtAgo(site.last_seen));
      if (site.last_seen !== null && site.last_seen !== undefined) {
        seen.setAttribute("data-when", String(site.last_seen));
        seen.title = fmtTime(site.last_seen);
      }
      tr.appendChild(seen);
      tr.appendChild(el("td", site.cause || ""));
      body.appendChild(tr);
    });
  }

  // ------------------------------------------------------------------ charts (uPlot)

  function siteColour(site, index) {
    return CONSORTIUM[site] || PALETTE[index % PALETTE.length];
  }

  // a line chart in node #id: rounds xs, one line per def {label, values, stroke, dash, show}; the
  // chart is kept (only its data replaced, legend choices kept) while the lines stay the same.
  // Returns whether it was drawn anew.
  function chart(id, xs, defs, yfmt) {
    const node = $(id);
    const data = [xs].concat(defs.map(function (d) { return d.values; }));
    const key = defs.map(function (d) { return d.label; }).join("\u0000");
    const old = charts[id];
    if (old && old.key === key) {
      old.plot.setData(data);
      return false;
    }
    if (old) old.plot.destroy();
    clear(node);
    const fmt = yfmt || function (v) { return fmtNum(v); };
    const tick = yfmt || function (v) { return v === null ? "" : String(Number(v.toPrecision(4))); };
    const opts = {
      width: Math.max(320, node.clientWidth || 800),
      height: 300,
      scales: {x: {time: false}},
      axes: [{label: "round", incrs: ROUND_STEPS, values: function (u, vals) { return vals.map(String); }},
             {size: 70, values: function (u, vals) { return vals.map(tick); }}],
      series: [{label: "round", value: function (u, v) { return v === null ? "–" : String(v); }}]
        .concat(defs.map(function (d) {
          return {label: d.label, stroke: d.stroke, dash: d.dash || [], width: 1.6, show: d.show !== false,
                  spanGaps: true, points: {show: xs.length <= 40},
                  value: function (u, v) { return v === null || v === undefined ? "–" : fmt(v); }};
        })),
    };
    charts[id] = {plot: new uPlot(opts, data, node), key: key};
    return true;
  }

  function toggles(container, kind, names, colour) {
    clear(container);
    names.forEach(function (name, i) {
      const label = el("label");
      const box = el("input");
      box.type = "checkbox";
      box.checked = !hidden[kind].has(name);
      box.setAttribute("data-" + kind, name);
      box.addEventListener("change", function () {
        if (box.checked) hidden[kind].delete(name); else hidden[kind].add(name);
        applyToggles();
      });
      label.appendChild(box);
      const text = el("span", " " + name);
      if (colour) text.style.color = colour(name, i);
      label.appendChild(text);
      container.appendChild(label);
    });
  }

  let curveSeries = [];

  function applyToggles() {
    const c = charts["curve-chart"];
    if (!c) return;
    curveSeries.forEach(function (d, i) {
      const show = !hidden.site.has(d.site) && !hidden.arm.has(d.arm);
      if (c.plot.series[i + 1].show !== show) c.plot.setSeries(i + 1, {show: show});
    });
  }

  function renderCurves(s) {
    const curves = s.curves || [];
    const select = $("curve-select");
    const keys = curves.map(function (c) { return c.key; });
    if (chosenCurve === null || keys.indexOf(chosenCurve) < 0) chosenCurve = keys.length ? keys[0] : null;
    if (Array.from(select.options).map(function (o) { return o.value; }).join("|") !== keys.join("|")) {
      clear(select);
      curves.forEach(function (c) {
        const o = el("option", c.split + " " + c.metric);
        o.value = c.key;
        select.appendChild(o);
      });
    }
    select.value = chosenCurve || "";
    const curve = curves.find(function (c) { return c.key === chosenCurve; });
    if (!curve) {
      $("curve-note").textContent = "No metrics recorded yet.";
      return;
    }
    $("curve-note").textContent = "Hover for values; click a site or an arm above, or a line's name in the " +
      "legend, to hide or show it.";
    const sites = [];
    const arms = [];
    curve.series.forEach(function (d) {
      if (sites.indexOf(d.site) < 0) sites.push(d.site);
      if (arms.indexOf(d.arm) < 0) arms.push(d.arm);
    });
    toggles($("site-toggles"), "site", sites, siteColour);
    toggles($("arm-toggles"), "arm", arms.length > 1 ? arms : [], null);
    curveSeries = curve.series;
    const defs = curve.series.map(function (d) {
      return {label: d.site + " · " + d.arm, values: d.values, stroke: siteColour(d.site, sites.indexOf(d.site)),
              dash: DASH[d.arm] || [], show: !hidden.site.has(d.site) && !hidden.arm.has(d.arm)};
    });
    if (chart("curve-chart", curve.rounds, defs, null)) applyToggles();
  }

  function renderPrivacy(s) {
    const p = s.privacy;
    $("privacy-section").hidden = !p;
    if (!p) return;
    const n = p.epsilon.length;
    const spent = n ? p.epsilon[n - 1] : null;
    let text = n ? "ε = " + fmtNum(spent, 3) + " spent after round " + p.rounds[n - 1] : "No round has completed yet";
    if (p.budget !== null && p.budget !== undefined) {
      text += " of a budget of " + p.budget + (n ? " (" + Math.round(100 * spent / p.budget) + "%)" : "");
    } else {
      text += " (no budget: max_epsilon not set)";
    }
    if (p.delta !== null && p.delta !== undefined) text += ", at δ = " + p.delta;
    if (p.mechanism) text += "; " + p.mechanism;
    $("privacy-text").textContent = text + ".";
    const defs = [{label: "ε spent", values: p.epsilon, stroke: "#b3261e"}];
    if (p.budget !== null && p.budget !== undefined) {
      defs.push({label: "budget", values: p.rounds.map(function () { return p.budget; }), stroke: "#777",
                 dash: [6, 4]});
    }
    chart("privacy-chart", p.rounds, defs, function (v) { return fmtNum(v, 2); });
  }

  function renderBytes(s) {
    const b = s.bytes;
    $("bytes-section").hidden = !b;
    if (!b) return;
    const defs = b.series.map(function (d, i) {
      return {label: d.label, values: d.values, stroke: PALETTE[i % PALETTE.length]};
    });
    chart("bytes-chart", b.rounds, defs, fmtBytes);
  }

  function renderAudit(s) {
    const a = s.audit;
    const table = $("audit");
    if (!a) {
      table.hidden = true;
      $("audit-text").textContent = s.mode === "simulation"
        ? "A simulation has no audit: its sites run inside the medfed process. A deployment's server audits every exchange with a site."
        : "No audit yet.";
      return;
    }
    const counts = Object.keys(a.statuses).map(function (k) { return a.statuses[k] + " " + k; }).join(", ");
    $("audit-text").textContent = a.total + " exchange" + (a.total === 1 ? "" : "s") + (counts ? " (" + counts + ")" : "") +
      (a.rows.length < a.total ? "; the latest " + a.rows.length + " are shown, newest first" : "; newest first") + ".";
    table.hidden = false;
    const body = table.tBodies[0];
    clear(body);
    a.rows.forEach(function (r) {
      const tr = el("tr");
      const when = el("td", fmtTime(r.when));
      tr.appendChild(when);
      tr.appendChild(el("td", r.arm));
      tr.appendChild(el("td", r.round, "num"));
      tr.appendChild(el("td", r.site));
      tr.appendChild(el("td", r.kind));
      tr.appendChild(el("td", r.status, "status-" + String(r.status).replace(/[^a-z]/g, "")));
      tr.appendChild(el("td", fmtBytes(r.bytes_sent), "num"));
      tr.appendChild(el("td", fmtBytes(r.bytes_received), "num"));
      tr.appendChild(el("td", fmtNum(r.seconds, 2), "num"));
      tr.appendChild(el("td", r.reason || ""));
      body.appendChild(tr);
    });
  }

  function renderLog(s) {
    const pre = $("log");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    clear(pre);
    const lines = (s.log && s.log.lines) || [];
    if (!lines.length) pre.textContent = "(run.log is empty)";
    lines.forEach(function (line) {
      const span = el("span", line.text + "\n", "level-" + String(line.level).replace(/[^A-Z]/g, ""));
      pre.appendChild(span);
    });
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  $("curve-select").addEventListener("change", function (e) {
    chosenCurve = e.target.value;
    if (snap) renderCurves(snap);
  });

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (id) {
      const node = $(id);
      charts[id].plot.setSize({width: Math.max(320, node.clientWidth || 800), height: 300});
    });
  });

  // a static page (report.html) embeds its data and has only the charts; the dashboard polls
  const embedded = document.getElementById("medfed-snapshot");
  if (embedded) {
    snap = JSON.parse(embedded.textContent);
    renderCharts(snap);
  } else {
    poll();
  }
})();
