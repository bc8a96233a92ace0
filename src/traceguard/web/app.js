// The web view of traceguard: every view rendered from JSON, live from the API
// (polled every refresh_ms) or, in the replay report, from the data inlined in
// the page. No framework, nothing loaded from elsewhere.
(function () {
  "use strict";
  const S = window.TRACEGUARD;
  const app = document.getElementById("app");
  const status = document.getElementById("status");
  const LIVE = S.mode === "live";
  const KINDS = ["missing_parent", "missing_root", "unfinished_span", "context_outlived_parent", "late_span",
    "unpaired_client_span", "missing_expected_span", "slow_stage", "latency_regression", "trace_outlier",
    "error_regression", "log_anomaly"];
  const SEVERITY = {critical: 0, warning: 1, info: 2};
  const SINCE = {"15m": 9e11, "1h": 36e11, "6h": 216e11, "24h": 864e11, "7d": 6048e11, "all": 0};
  const expanded = new Set();  // span ids whose details are open, kept across refreshes
  let shown = "";              // the last rendered data, to redraw only on a change
  let updates = 0;             // renders finished, on <body data-updates> for whoever waits on the page

  // -- helpers ---------------------------------------------------------------
  function esc(value) {
    return String(value === undefined || value === null ? "" : value).replace(/[&<>"']/g,
      (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
  }
  function utc(ns) {
    if (!ns) return "";
    return new Date(ns / 1e6).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }
  function ms(ns) {
    if (!ns) return "0";
    const v = ns / 1e6;
    if (v >= 10000) return (v / 1000).toFixed(1) + " s";
    if (v >= 100) return v.toFixed(0) + " ms";
    if (v >= 1) return v.toFixed(1) + " ms";
    return v.toFixed(3) + " ms";
  }
  function colour(service) {
    let h = 0;
    for (const ch of String(service)) h = (h * 31 + ch.charCodeAt(0)) % 360;
    return "hsl(" + h + ", 55%, 52%)";
  }
  function stageLink(service, operation) {
    return '<a class="stage" href="#/stage/' + encodeURIComponent(service) + "/" + encodeURIComponent(operation) +
      '">' + esc(service) + " '" + esc(operation) + "'</a>";
  }
  function traceLink(id, incidentId) {
    return '<a class="trace" href="#/trace/' + esc(id) + (incidentId ? "?incident=" + encodeURIComponent(incidentId) :
      "") + '">' + esc(id.slice(0, 16)) + "…</a>";
  }
  function badge(text, cls) {
    return '<span class="badge ' + esc(cls || text) + '">' + esc(text) + "</span>";
  }
  function bySeverity(a, b) {
    return (SEVERITY[a.severity] - SEVERITY[b.severity]) || (b.score - a.score) || (b.detected_at - a.detected_at);
  }
  function niceStep(span, ticks) {
    const raw = span / ticks, power = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    for (const m of [1, 2, 5, 10]) if (raw <= m * power) return m * power;
    return 10 * power;
  }
  function query(params) {
    return Object.keys(params).filter((k) => params[k] !== undefined && params[k] !== "")
      .map((k) => encodeURIComponent(k) + "=" + encodeURIComponent(params[k])).join("&");
  }

  // -- where the data comes from ----------------------------------------------
  class NeedToken extends Error {}
  async function api(path) {
    const token = sessionStorage.getItem("traceguard.token");
    const response = await fetch(path, {headers: token ? {authorization: "Bearer " + token} : {}});
    if (response.status === 401) throw new NeedToken();
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(path + ": " + response.status + " " + (await response.text()).slice(0, 300));
    return response.json();
  }
  const D = S.data || {};
  function matches(f, filters, since) {
    return (!filters.kind || f.kind === filters.kind) && (!filters.service || f.service === filters.service) &&
      (!filters.operation || f.operation === filters.operation) && (!since || f.detected_at >= since);
  }
  const source = LIVE ? {
    async home(filters, since) {
      const [incidents, findings] = await Promise.all([
        api("api/incidents?" + query({limit: 1000, service: filters.service, operation: filters.operation})),
        api("api/anomalies?" + query({order: "newest", limit: 200, kind: filters.kind, service: filters.service,
          operation: filters.operation, since: since || undefined}))]);
      return {incidents: incidents.items, findings: findings.items, more: findings.next !== null};
    },
    incident: (id) => api("api/incidents/" + encodeURIComponent(id)),
    trace: (id) => api("api/traces/" + encodeURIComponent(id)),
    stage: (service, operation) => api("api/stages?" + query({service: service, operation: operation})),
  } : {
    async home(filters, since) {
      const findings = (D.findings || []).filter((f) => matches(f, filters, since)).sort(bySeverity);
      const incidents = (D.incidents || []).filter((i) => !filters.service ||
        i.culprits.concat(i.affected).some((s) => s.service === filters.service));
      return {incidents: incidents, findings: findings, more: false};
    },
    async incident(id) {
      const incident = (D.incidents || []).find((i) => i.id === id);
      return incident ? Object.assign({}, incident, {findings: (D.findings || []).filter((f) =>
        f.incident_id === id)}) : null;
    },
    async trace(id) {
      const findings = (D.findings || []).filter((f) => f.trace_id === id);
      const trace = (D.traces || {})[id] || null;
      return trace || findings.length ? {trace: trace, findings: findings} : null;
    },
    async stage(service, operation) {
      return {series: (D.series || []).filter((s) => s.service === service && s.operation === operation),
        findings: (D.findings || []).filter((f) => f.service === service && f.operation === operation)};
    },
  };

  // -- views -------------------------------------------------------------------
  function findingRows(findings, withStage) {
    if (!findings.length) return '<p class="muted">None.</p>';
    return '<table class="findings"><thead><tr><th>detected (UTC)</th><th>severity</th><th>kind</th>' +
      (withStage ? "<th>stage</th>" : "") + "<th>summary</th><th>trace / incident</th></tr></thead><tbody>" +
      findings.map((f) => '<tr class="finding" data-kind="' + esc(f.kind) + '"><td>' + esc(utc(f.detected_at)) +
        "</td><td>" + badge(f.severity) + "</td><td>" + esc(f.kind) + "</td>" +
        (withStage ? "<td>" + (f.service ? stageLink(f.service, f.operation) : "") + "</td>" : "") +
        "<td>" + esc(f.summary) + "</td><td>" + (f.trace_id ? traceLink(f.trace_id) : "") +
        (f.incident_id ? ' <a href="#/incident/' + esc(f.incident_id) + '">incident</a>' : "") +
        "</td></tr>").join("") + "</tbody></table>";
  }

  // A culprit whose fault is one pod's (its service's other pods did not change).
  function podOf(stage) {
    return stage.instance ? ' <span class="pod">on pod ' + esc(stage.instance) + "</span>" : "";
  }

  function incidentRows(incidents) {
    if (!incidents.length) return '<p class="muted">No incidents.</p>';
    incidents = incidents.slice().sort((a, b) => (a.state === "open" ? 0 : 1) - (b.state === "open" ? 0 : 1) ||
      b.onset - a.onset);
    return '<table class="incidents"><thead><tr><th>state</th><th>onset (UTC)</th><th>culprit</th>' +
      "<th>summary</th><th>findings explained</th></tr></thead><tbody>" + incidents.map((i) =>
      '<tr class="incident ' + esc(i.state) + '"><td>' + badge(i.state) + '</td><td><a href="#/incident/' +
        esc(i.id) + '">' + esc(utc(i.onset)) + "</a></td><td>" + i.culprits.map((c) =>
        stageLink(c.service, c.operation) + " " + esc(c.signal) + " ×" + esc(c.magnitude) + podOf(c)).join("<br>") +
        "</td><td>" + esc(i.summary) + "</td><td>" + esc(Object.entries(i.attached || {}).map((e) =>
        e[0] + " " + e[1]).join(", ")) + "</td></tr>").join("") + "</tbody></table>";
  }

  function filterForm(filters) {
    const kinds = ['<option value="">every kind</option>'].concat(KINDS.map((k) =>
      "<option" + (k === filters.kind ? " selected" : "") + ">" + k + "</option>"));
    const since = Object.keys(SINCE).map((k) => "<option" + (k === (filters.since || "all") ? " selected" : "") +
      ">" + k + "</option>");
    return '<form id="filters" class="filters"><label>kind <select name="kind">' + kinds.join("") +
      '</select></label> <label>service <input name="service" value="' + esc(filters.service) +
      '"></label> <label>operation <input name="operation" value="' + esc(filters.operation) +
      '"></label> <label>detected in the last <select name="since">' + since.join("") +
      '</select></label> <button>filter</button></form>';
  }

  async function home(filters) {
    const window_ = SINCE[filters.since || "all"];
    const since = window_ ? Date.now() * 1e6 - window_ : 0;
    const data = await source.home(filters, since);
    const open = data.incidents.filter((i) => i.state === "open").length;
    const counts = D.counts ? '<table class="counts"><thead><tr><th>kind</th><th>findings in the replay</th>' +
      "</tr></thead><tbody>" + Object.entries(D.counts).map((e) => "<tr><td>" + esc(e[0]) + '</td><td class="n">' +
      esc(e[1]) + "</td></tr>").join("") + '</tbody></table><p class="muted">Listed below: every stage-level ' +
      "finding and the " + (D.findings || []).filter((f) => f.trace_id).length + " most severe per-trace ones, " +
      "with their traces.</p>" : "";
    return {data: data, html: "<h1>Incidents <small>" + open + " open, " + (data.incidents.length - open) +
      " resolved</small></h1>" + incidentRows(data.incidents) + "<h1>Findings</h1>" + counts + filterForm(filters) +
      findingRows(data.findings, true) + (data.more ? '<p class="muted">Newest 200 shown; narrow the filter ' +
      "for older ones.</p>" : "")};
  }

  async function incident(id) {
    const i = await source.incident(id);
    if (!i) return {data: null, html: "<h1>No incident " + esc(id) + "</h1>"};
    const stages = (list, culprit) => list.length ? '<table class="stages"><thead><tr><th>stage</th><th>kind</th>' +
      "<th>" + (culprit ? "what changed" : "how it is affected") + "</th><th>" + (culprit ? "magnitude" :
      "traces seen through it") + "</th></tr></thead><tbody>" + list.map((s) => '<tr class="' +
      (culprit ? "culprit" : "affected") + '"><td>' + stageLink(s.service, s.operation) + "</td><td>" +
      esc(s.span_kind) + "</td><td>" + esc(s.signal) + podOf(s) + "</td><td>" + esc(s.magnitude) + "</td></tr>").join("") +
      "</tbody></table>" : '<p class="muted">None.</p>';
    return {data: i, html: "<h1>Incident " + badge(i.state) + " <small>" + esc(i.id) + "</small></h1>" +
      '<p class="summary">' + esc(i.summary) + "</p><p>onset " + esc(utc(i.onset)) + (i.resolved_at ?
      ", resolved " + esc(utc(i.resolved_at)) : "") + ", updated " + esc(utc(i.updated_at)) + "</p>" +
      "<h2>Culprit" + (i.culprits.length > 1 ? "s" : "") + "</h2>" + stages(i.culprits, true) +
      "<h2>Affected callers</h2>" + stages(i.affected, false) + (i.exemplars && i.exemplars.length ?
      '<h2>Exemplar traces</h2><ul class="exemplars">' + i.exemplars.map((t) => "<li>" + traceLink(t, i.id) + "</li>")
        .join("") + "</ul>" : "") + "<h2>Findings</h2>" +
      findingRows(i.findings.slice().sort(bySeverity), true) +
      (i.logs && i.logs.length ? "<h2>Logs</h2>" + logItems(i.logs, 0) : "")};
  }

  // Log records (a finding's linked logs and a kept trace's have the same fields):
  // their time relative to t0, or in UTC when t0 is 0.
  function logItems(logs, t0) {
    return '<ul class="logs">' + logs.map((l) => '<li class="log ' + esc((l.severity_text || "").toLowerCase()) +
      '">' + esc(t0 ? "+" + ms(l.time_unix_nano - t0) : utc(l.time_unix_nano)) + " " + esc(l.service) + " " +
      esc(l.severity_text) + ": " + esc(l.body) + "</li>").join("") + "</ul>";
  }

  // The roots, then the spans whose parent never came (where the root was lost), each by start.
  function topSpans(spans) {
    const ids = new Set(spans.map((s) => s.span_id));
    return spans.filter((s) => !s.parent_span_id || !ids.has(s.parent_span_id))
      .sort((a, b) => (a.parent_span_id ? 1 : 0) - (b.parent_span_id ? 1 : 0) || a.start - b.start);
  }

  // Spans depth first from the roots (and the spans whose parent never came), children by start.
  function treeOrder(spans) {
    const byId = new Map(spans.map((s) => [s.span_id, s]));
    const children = new Map();
    for (const s of spans) {
      if (s.parent_span_id && byId.has(s.parent_span_id)) {
        if (!children.has(s.parent_span_id)) children.set(s.parent_span_id, []);
        children.get(s.parent_span_id).push(s);
      }
    }
    const tops = topSpans(spans);
    const ordered = [], seen = new Set();
    const walk = (span, depth) => {
      if (seen.has(span.span_id)) return;
      seen.add(span.span_id);
      ordered.push({span: span, depth: depth});
      (children.get(span.span_id) || []).sort((a, b) => a.start - b.start).forEach((c) => walk(c, depth + 1));
    };
    tops.forEach((s) => walk(s, s.parent_span_id ? 1 : 0));
    return {ordered: ordered, byId: byId};
  }

  function waterfall(trace, findings, culprits) {
    const spans = trace.spans;
    if (!spans.length) return '<p class="muted">No spans kept.</p>';
    const {ordered, byId} = treeOrder(spans);
    const finished = (s) => s.end > 0 && s.end >= s.start;
    const t0 = Math.min.apply(null, spans.map((s) => s.start));
    const t1 = Math.max.apply(null, spans.map((s) => finished(s) ? s.end : s.start)) || t0 + 1;
    const total = Math.max(t1 - t0, 1);
    const pct = (t) => ((t - t0) / total * 100).toFixed(3) + "%";
    const marked = new Map();
    for (const f of findings) if (f.span_id) marked.set(f.span_id, (marked.get(f.span_id) || []).concat(f.kind));
    const logs = new Map();
    for (const l of trace.logs || []) {
      const key = l.span_id && byId.has(l.span_id) ? l.span_id : "";
      logs.set(key, (logs.get(key) || []).concat(l));
    }
    const step = niceStep(total, 8);
    let axis = "";
    for (let t = 0; t <= total; t += step) {
      axis += '<span class="tick" style="left:' + (t / total * 100).toFixed(3) + '%">' + esc(ms(t)) + "</span>";
    }
    const rows = [];
    const ghost = (label, depth, note) => rows.push('<div class="row ghost"><div class="label" style="padding-left:' +
      (depth * 14 + 4) + 'px">' + esc(label) + '</div><div class="lane"><span class="note">' + esc(note) +
      "</span></div></div>");
    const missingParents = new Set();
    for (const {span, depth} of ordered) {
      if (span.parent_span_id && !byId.has(span.parent_span_id) && !missingParents.has(span.parent_span_id)) {
        missingParents.add(span.parent_span_id);
        ghost("parent " + span.parent_span_id + " (never arrived)", depth - 1, "a span that never arrived");
      }
      const end = finished(span) ? span.end : t1;
      const kinds = marked.get(span.span_id) || [];
      const cls = ["row", "span"];
      if (span.status === "error") cls.push("error");
      if (kinds.length) cls.push("anomalous");
      if (!finished(span)) cls.push("unfinished");
      const culprit = culprits.has(span.service + "\u001f" + span.name);
      if (culprit) cls.push("culprit");
      const own = logs.get(span.span_id) || [];
      const marks = own.map((l) => '<i class="logmark ' + esc(l.severity_text.toLowerCase()) + '" style="left:' +
        pct(Math.min(Math.max(l.time_unix_nano, t0), t1)) + '" title="' + esc(l.severity_text + ": " + l.body) +
        '"></i>').join("");
      rows.push('<div class="' + cls.join(" ") + '" data-span-id="' + esc(span.span_id) + '" tabindex="0">' +
        '<div class="label" style="padding-left:' + (depth * 14 + 4) + 'px"><span class="dot" style="background:' +
        colour(span.service) + '"></span>' + badge(span.kind, "kind " + span.kind) + " " + esc(span.service) +
        ": " + esc(span.name) + (span.status === "error" ? ' <b class="err" title="status ERROR">!</b>' : "") +
        (kinds.length ? " " + kinds.map((k) => badge(k, "flag")).join(" ") : "") +
        (culprit ? " " + badge("incident culprit", "flag") : "") + '</div><div class="lane">' +
        '<div class="bar" style="left:' + pct(span.start) + ";width:max(2px," + ((end - span.start) / total * 100)
          .toFixed(3) + "%);background:" + colour(span.service) + '"></div>' + marks +
        '<span class="duration" style="left:' + pct(end) + '">' + (finished(span) ? esc(ms(span.end - span.start)) :
        "never ended") + "</span></div></div>");
      if (expanded.has(span.span_id)) rows.push(spanDetail(span, own, t0));
    }
    for (const f of findings) {
      for (const m of (f.kind === "missing_expected_span" && f.evidence.missing_stages) || []) {
        ghost(m.service + ": " + m.operation + " (missing)", 1, "expected: in " +
          (m.presence * 100).toFixed(1) + "% of normal traces of this root");
      }
    }
    const loose = logs.get("") || [];
    return '<div class="waterfall"><div class="axis"><div class="label">' + spans.length + " of " +
      trace.spans_total + ' spans, click one for its attributes and logs</div><div class="lane">' + axis +
      "</div></div>" + rows.join("") + "</div>" + (loose.length ? "<h2>Logs not on a kept span</h2>" +
      logItems(loose, t0) : "");
  }

  function spanDetail(span, logs, t0) {
    const attributes = Object.entries(span.attributes || {});
    return '<div class="detail" data-detail-of="' + esc(span.span_id) + '"><table class="attributes"><tbody>' +
      [["span id", span.span_id], ["parent", span.parent_span_id || "(root)"], ["kind", span.kind],
        ["status", span.status], ["start", utc(span.start) + " (+" + ms(span.start - t0) + ")"],
        ["end", span.end ? utc(span.end) : "never"]].concat(attributes).map((a) => "<tr><th>" + esc(a[0]) +
        "</th><td>" + esc(typeof a[1] === "object" ? JSON.stringify(a[1]) : a[1]) + "</td></tr>").join("") +
      "</tbody></table>" + (logs.length ? logItems(logs, t0) : '<p class="muted">No logs on this span.</p>') +
      "</div>";
  }

  async function trace(id, incidentId) {
    const [t, i] = await Promise.all([source.trace(id), incidentId ? source.incident(incidentId) : null]);
    const culprits = new Set(i ? i.culprits.map((c) => c.service + "\u001f" + c.operation) : []);
    if (!t) return {data: null, html: "<h1>Nothing kept of trace " + esc(id) + "</h1>"};
    const findings = t.findings.slice().sort(bySeverity);
    const root = t.trace && topSpans(t.trace.spans)[0];  // the entry stage, even where the root was lost
    const link = S.trace_link ? ' <a class="linkout" href="' + esc(S.trace_link.replace("{trace_id}", id)) +
      '" target="_blank" rel="noopener">open in the tracing UI</a>' : "";
    return {data: t, html: "<h1>Trace <small>" + esc(id) + "</small>" + link + "</h1>" + (root ? "<p>" +
      stageLink(root.service, root.name) + " " + esc(utc(root.start)) + "</p>" : "") + (i ? '<p class="exemplar">An exemplar of <a href="#/incident/' + esc(i.id) +
      '">the incident</a>: ' + esc(i.summary) + "</p>" : "") + "<h2>Findings</h2>" + findingRows(findings, true) + "<h2>Waterfall</h2>" + (t.trace ? waterfall(t.trace, findings,
      culprits) :
      '<p class="muted">The spans of this trace were not kept.</p>')};
  }

  function plot(points, lines, band, onsets, unit, format) {
    // points: [{t, values...}], lines: [[key, class, label]], band: [low, high] | null, onsets: [ns]
    const width = 900, height = 220, left = 64, right = 12, top = 10, bottom = 28;
    if (!points.length) return '<p class="muted">No windows recorded yet.</p>';
    const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
    let high = 0;
    for (const p of points) for (const l of lines) high = Math.max(high, p[l[0]]);
    if (band) high = Math.max(high, band[1]);
    high = high * 1.1 || 1;
    const x = (t) => left + (t - t0) / (t1 - t0) * (width - left - right);
    const y = (v) => height - bottom - v / high * (height - top - bottom);
    let svg = '<svg class="plot" viewBox="0 0 ' + width + " " + height + '" width="' + width + '" height="' + height +
      '">';
    if (band) {
      svg += '<rect class="baseline" x="' + left + '" y="' + y(band[1]).toFixed(1) + '" width="' +
        (width - left - right) + '" height="' + Math.max(y(band[0]) - y(band[1]), 1).toFixed(1) +
        '"><title>baseline</title></rect>';
    }
    const vstep = niceStep(high, 4);
    for (let v = 0; v <= high; v += vstep) {
      svg += '<line class="grid" x1="' + left + '" x2="' + (width - right) + '" y1="' + y(v).toFixed(1) + '" y2="' +
        y(v).toFixed(1) + '"></line><text x="' + (left - 4) + '" y="' + (y(v) + 4).toFixed(1) +
        '" text-anchor="end">' + esc(format(v)) + "</text>";
    }
    const tstep = niceStep(t1 - t0, 6);
    for (let t = Math.ceil(t0 / tstep) * tstep; t <= t1; t += tstep) {
      svg += '<text x="' + x(t).toFixed(1) + '" y="' + (height - 8) + '" text-anchor="middle">' +
        esc(new Date(t / 1e6).toISOString().slice(11, 19)) + "</text>";
    }
    for (const l of lines) {
      svg += '<polyline class="' + l[1] + '" points="' + points.map((p) => x(p.t).toFixed(1) + "," +
        y(p[l[0]]).toFixed(1)).join(" ") + '"><title>' + esc(l[2]) + "</title></polyline>";
    }
    for (const onset of onsets) {
      if (onset >= t0 && onset <= t1) {
        svg += '<line class="onset" x1="' + x(onset).toFixed(1) + '" x2="' + x(onset).toFixed(1) + '" y1="' + top +
          '" y2="' + (height - bottom) + '"><title>onset ' + esc(utc(onset)) + "</title></line>";
      }
    }
    return svg + "</svg><p class=\"legend\">" + lines.map((l) => '<b class="' + l[1] + '">' + esc(l[2]) + "</b>")
      .join(" ") + (band ? ' <span class="baseline-key">baseline</span>' : "") + (onsets.length ?
      ' <span class="onset-key">onset</span>' : "") + " " + esc(unit) + "</p>";
  }

  async function stage(service, operation) {
    const s = await source.stage(service, operation);
    const findings = (s && s.findings) || [];
    const regressions = findings.filter((f) => f.kind === "latency_regression");
    const errors = findings.filter((f) => f.kind === "error_regression");
    let html = "<h1>Stage " + esc(service) + " '" + esc(operation) + "'</h1>";
    if (!s || !s.series.length) html += '<p class="muted">No windows of this stage are recorded (they are kept in ' +
      "memory for the recent past, and only for stages with measured calls).</p>";
    for (const series of (s && s.series) || []) {
      const base = regressions.length && regressions[0].evidence.baseline;
      html += "<h2>" + esc(series.span_kind) + " self time per window</h2>" + plot(
        series.latency.map((w) => ({t: w.start, p50: w.p50_ns, p95: w.p95_ns})),
        [["p50", "p50", "p50"], ["p95", "p95", "p95"]],
        base ? [base.p50_ms * 1e6, (base.p95_ms || base.p99_ms) * 1e6] : null,
        regressions.map((f) => f.evidence.onset_unix_nano), "(self time)", ms);
      html += "<h2>" + esc(series.span_kind) + " own failures per window</h2>" + plot(
        series.errors.map((w) => ({t: w.start, rate: w.calls ? w.failed / w.calls * 100 : 0})),
        [["rate", "rate", "failed calls %"]], null,
        errors.map((f) => f.evidence.onset_unix_nano), "(share of calls)", (v) => v.toFixed(1) + " %");
    }
    return {data: s, html: html + "<h2>Findings</h2>" + findingRows(findings.slice().sort(bySeverity), false)};
  }

  // -- routing and refresh ------------------------------------------------------
  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, search] = hash.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    const filters = Object.fromEntries(new URLSearchParams(search || ""));
    if (parts[0] === "incident" && parts[1]) return () => incident(parts[1]);
    if (parts[0] === "trace" && parts[1]) return () => trace(parts[1], filters.incident);
    if (parts[0] === "stage" && parts.length >= 3) return () => stage(parts[1], parts.slice(2).join("/"));
    return () => home(filters);
  }

  // One render at a time. A forced one (a click, a new token) asked for while a refresh is in flight
  // runs after it: the refresh may have started before the token was kept and would end on the form.
  let rendering = null;
  async function render(force) {
    if (rendering) return force ? rendering.then(() => render(true)) : rendering;
    rendering = (async () => {
      try {
        const view = await route()();
        const key = location.hash + JSON.stringify(view.data) + [...expanded].join();
        if (force || key !== shown) {
          shown = key;
          app.innerHTML = view.html;
        }
        status.textContent = LIVE ? "live, updated " + new Date().toISOString().slice(11, 19) + "Z" :
          "replay report, " + (S.data.generated || "");
        document.body.dataset.rendered = "yes";
      } catch (error) {
        if (error instanceof NeedToken) {
          // The refresh keeps asking while the form is up; drawing it again would wipe what is being typed.
          if (!document.getElementById("token")) {
            app.innerHTML = '<h1>This traceguard needs its API token</h1><form id="token"><input type="password" ' +
              'name="token" placeholder="bearer token" autocomplete="off"> <button>use it</button></form>' +
              '<p class="muted">Kept for this browser tab only (sessionStorage).</p>';
          }
          status.textContent = sessionStorage.getItem("traceguard.token") ? "the API refused this token" : "";
        } else {
          status.textContent = "could not update: " + error.message;
        }
        document.body.dataset.rendered = "yes";
      } finally {
        document.body.dataset.updates = ++updates;
        rendering = null;
      }
    })();
    return rendering;
  }

  app.addEventListener("click", (event) => {
    const row = event.target.closest(".row.span");
    if (!row || event.target.closest("a")) return;
    const id = row.dataset.spanId;
    if (expanded.has(id)) expanded.delete(id); else expanded.add(id);
    render(true);
  });
  app.addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    if (event.target.id === "token") {
      sessionStorage.setItem("traceguard.token", form.get("token"));
      render(true);
      return;
    }
    const filters = {};
    for (const [k, v] of form.entries()) if (v && !(k === "since" && v === "all")) filters[k] = v;
    location.hash = "#/?" + query(filters);
  });
  window.addEventListener("hashchange", () => { expanded.clear(); window.scrollTo(0, 0); render(true); });
  render(true);
  if (LIVE) setInterval(() => { if (!document.hidden) render(false); }, S.refresh_ms);
})();
