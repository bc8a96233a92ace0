"""The replay report: one self-contained HTML file (inline CSS and SVG, no network).

``ReportCollector`` is a sink and a decided-trace listener of the pipeline: it
keeps the findings, a bounded sample of each stage's self times per
event-time window (for the latency plots), and the spans of the first traces
with findings (for the waterfalls). ``render`` writes the page: a summary by
kind, service and operation; per ``latency_regression``, the stage's p50/p95
per window with the baseline band and the onset; per trace-level finding (the
first N), a waterfall with the anomalous span highlighted and its linked logs.
"""

from __future__ import annotations

import datetime as dt
import html
from collections import Counter, defaultdict
from pathlib import Path

from traceguard.models.features import self_times
from traceguard.records import Anomaly, Incident, Trace

_KINDS = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5, "unspecified": 0}
_MAX_STAGES = 500
_SAMPLES_PER_WINDOW = 256


class ReportCollector:
    """Memory is bounded whatever the input's size: counts for the summary, stage-level
    findings (few), the first ``max_waterfalls`` trace findings, bounded samples."""

    def __init__(self, window_ns: int, max_waterfalls: int = 20) -> None:
        self.window_ns = window_ns
        self.max_waterfalls = max_waterfalls
        self.by_kind: Counter = Counter()
        self.by_stage: Counter = Counter()
        self.stage_findings: dict[str, Anomaly] = {}  # by id: a resolved regression replaces its open version
        self.incidents: dict[str, Incident] = {}       # by id, last state; one per fault
        self.trace_findings: list[Anomaly] = []
        self._samples: dict[tuple, dict[int, list[int]]] = defaultdict(dict)
        self._flagged: set[str] = set()
        self.waterfalls: dict[str, list[tuple]] = {}

    # -- sink ----------------------------------------------------------------
    def emit(self, anomaly: Anomaly) -> None:
        if anomaly.trace_id is None:
            if anomaly.id not in self.stage_findings:
                self._count(anomaly)
            self.stage_findings[anomaly.id] = anomaly
            return
        self._count(anomaly)
        if anomaly.trace_id in self._flagged or anomaly.trace_id in self.waterfalls:
            self.trace_findings.append(anomaly)
        elif len(self.waterfalls) + len(self._flagged) < self.max_waterfalls:
            self._flagged.add(anomaly.trace_id)
            self.trace_findings.append(anomaly)

    def emit_incident(self, incident: Incident) -> None:
        self.incidents[incident.id] = incident

    def _count(self, anomaly: Anomaly) -> None:
        self.by_kind[anomaly.kind.value] += 1
        self.by_stage[(anomaly.kind.value, anomaly.service or "", anomaly.operation or "")] += 1

    def flush(self) -> None:
        """Nothing to make durable: the report is written at the end."""

    def close(self) -> None:
        """Rendering is the front end's call."""

    # -- decided traces --------------------------------------------------------
    def on_trace(self, trace: Trace) -> None:
        for span, self_time in zip(trace.spans, self_times(trace)):
            if self_time is None:
                continue
            stage = (span.service, span.name, span.kind)
            windows = self._samples.get(stage)
            if windows is None:
                if len(self._samples) >= _MAX_STAGES:
                    continue
                windows = self._samples[stage] = {}
            bucket = windows.setdefault(span.end // self.window_ns, [])
            if len(bucket) < _SAMPLES_PER_WINDOW:
                bucket.append(self_time)
        trace_hex = trace.trace_id.hex()
        if trace_hex in self._flagged:
            self._flagged.discard(trace_hex)
            self.waterfalls[trace_hex] = [
                (s.span_id.hex(), s.parent_span_id.hex() if s.parent_span_id else None, s.service, s.name,
                 s.start, s.end) for s in _tree_order(trace)]

    # -- rendering -------------------------------------------------------------
    def render(self, path: Path) -> None:
        parts = [_HEAD, "<h1>traceguard replay report</h1>", self._incidents(), self._summary()]
        parts += [self._latency(f) for f in self.stage_findings.values() if f.kind.value == "latency_regression"]
        shown = [f for f in self.trace_findings if f.trace_id in self.waterfalls][: self.max_waterfalls]
        if shown:
            parts.append(f"<h2>Trace findings (first {len(shown)})</h2>")
            parts += [self._waterfall(f) for f in shown]
        parts.append("<script>document.body.dataset.rendered = 'yes';</script></body></html>")
        path.write_text("\n".join(parts), encoding="utf-8")

    def _incidents(self) -> str:
        """Incidents first: one row per fault, the culprit named, what it explains."""
        if not self.incidents:
            return "<h2>Incidents: none</h2>"
        rows = []
        for incident in sorted(self.incidents.values(), key=lambda i: i.onset):
            onset = dt.datetime.fromtimestamp(incident.onset / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            culprits = "<br>".join(f"{_e(c.service)} '{_e(c.operation)}' ({_e(c.signal)} x{c.magnitude})"
                                   for c in incident.culprits)
            affected = "<br>".join(f"{_e(a.service)} '{_e(a.operation)}' ({a.magnitude:g})" for a in incident.affected[:5])
            explained = ", ".join(f"{k} {n}" for k, n in incident.attached.items())
            rows.append(f"<tr class=incident><td>{onset}</td><td>{incident.state}</td><td>{culprits}</td>"
                        f"<td>{affected}</td><td>{_e(explained)}</td><td>{_e(incident.summary)}</td></tr>")
        return (f"<h2>Incidents: {len(self.incidents)}</h2><table class=summary><tr><th>onset (UTC)</th><th>state</th>"
                "<th>culprit first</th><th>affected callers</th><th>findings explained</th><th>summary</th></tr>"
                + "".join(rows) + "</table>")

    def _summary(self) -> str:
        rows = "".join(f"<tr><td>{_e(k)}</td><td class=n>{n}</td></tr>" for k, n in sorted(self.by_kind.items()))
        stage_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(s)}</td><td>{_e(o)}</td><td class=n>{n}</td></tr>"
                             for (k, s, o), n in self.by_stage.most_common(50))
        return (f"<h2>Summary: {sum(self.by_kind.values())} findings</h2><table class=summary><tr><th>kind</th><th>count</th>"
                f"</tr>{rows}</table><table class=summary><tr><th>kind</th><th>service</th><th>operation</th>"
                f"<th>count</th></tr>{stage_rows}</table>")

    def _latency(self, finding: Anomaly) -> str:
        evidence = finding.evidence
        stage = (finding.service, finding.operation, _KINDS.get(evidence.get("stage_kind", ""), 0))
        windows = sorted(self._samples.get(stage, {}).items())
        points = [(w * self.window_ns, _quantile(v, 0.5), _quantile(v, 0.95)) for w, v in windows if v]
        title = f"latency_regression: {finding.summary}"
        if not points:
            return f"<h2>{_e(title)}</h2><p>No samples of this stage were kept.</p>"
        width, height, pad = 900, 260, 40
        t0, t1 = points[0][0], points[-1][0] or points[0][0] + 1
        base = evidence.get("baseline", {})
        top = max(max(p[2] for p in points), base.get("p99_ms", 0) * 1e6) * 1.1 or 1

        def x(t: int) -> float:
            return pad + (t - t0) / max(t1 - t0, 1) * (width - 2 * pad)

        def y(ns: float) -> float:
            return height - pad - ns / top * (height - 2 * pad)

        band = ""
        if base:
            low, high = y(base.get("p50_ms", 0) * 1e6), y(base.get("p99_ms", 0) * 1e6)
            band = (f'<rect class="baseline" x="{pad}" y="{high:.1f}" width="{width - 2 * pad}" '
                    f'height="{max(low - high, 1):.1f}"><title>baseline p50–p99</title></rect>')
        onset = evidence.get("onset_unix_nano")
        marker = (f'<line class="onset" x1="{x(onset):.1f}" x2="{x(onset):.1f}" y1="{pad}" y2="{height - pad}">'
                  f'<title>onset {_time(onset)}</title></line>') if onset else ""
        lines = "".join(
            f'<polyline class="{name}" points="{" ".join(f"{x(p[0]):.1f},{y(p[i]):.1f}" for p in points)}">'
            f'<title>{name}</title></polyline>' for i, name in ((1, "p50"), (2, "p95")))
        axis = (f'<text x="{pad}" y="{height - 8}">{_time(t0)}</text>'
                f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{_time(t1)}</text>'
                f'<text x="4" y="{pad}">{top / 1e6:.1f} ms</text>')
        return (f"<h2>{_e(title)}</h2><svg class=\"latency-plot\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" "
                f"height=\"{height}\">{band}{lines}{marker}{axis}</svg>"
                "<p class=legend>self time per window: <b class=p50>p50</b> <b class=p95>p95</b>, "
                "shaded: baseline p50–p99, red line: onset</p>")

    def _waterfall(self, finding: Anomaly) -> str:
        spans = self.waterfalls[finding.trace_id]
        starts = [s[4] for s in spans]
        ends = [s[5] if s[5] >= s[4] else s[4] for s in spans]
        t0, t1 = min(starts), max(ends) or min(starts) + 1
        depth: dict[str, int] = {}
        width, row, label = 900, 18, 320
        bars = []
        for i, (span_id, parent, service, name, start, end) in enumerate(spans):
            depth[span_id] = depth.get(parent, -1) + 1 if parent in depth else 0
            end = end if end >= start else start
            x0 = label + (start - t0) / max(t1 - t0, 1) * (width - label - 10)
            x1 = label + (end - t0) / max(t1 - t0, 1) * (width - label - 10)
            cls = "span anomalous" if span_id == finding.span_id else "span"
            bars.append(f'<text x="{4 + 10 * depth[span_id]}" y="{i * row + 13}">{_e(service)}: {_e(name[:40])}</text>'
                        f'<rect class="{cls}" x="{x0:.1f}" y="{i * row + 3}" width="{max(x1 - x0, 1):.1f}" '
                        f'height="{row - 6}"><title>{(end - start) / 1e6:.2f} ms</title></rect>')
        logs = "".join(f"<li>{_time(log.time_unix_nano)} {_e(log.service)} {_e(log.severity_text)}: "
                       f"{_e(str(log.body))}</li>" for log in finding.logs)
        return (f"<h3>{_e(finding.kind.value)} — trace {finding.trace_id}</h3><p>{_e(finding.summary)}</p>"
                f"<svg class=\"waterfall\" viewBox=\"0 0 {width} {len(spans) * row + 4}\" width=\"{width}\" "
                f"height=\"{len(spans) * row + 4}\">{''.join(bars)}</svg>"
                + (f"<ul class=logs>{logs}</ul>" if logs else "<p class=logs>no linked logs</p>"))


def _tree_order(trace: Trace) -> list:
    """Spans depth first from the roots (and orphans), children by start time."""
    by_start = sorted(trace.spans, key=lambda s: s.start)
    tops = [s for s in by_start if s.parent_span_id is None or s.parent_span_id not in trace.by_id]
    ordered, stack, seen = [], list(reversed(tops)), set()
    while stack:
        span = stack.pop()
        if span.span_id in seen:
            continue
        seen.add(span.span_id)
        ordered.append(span)
        stack.extend(reversed(sorted(trace.children.get(span.span_id, ()), key=lambda s: s.start)))
    return ordered + [s for s in by_start if s.span_id not in seen]


def _quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _time(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _e(text: str) -> str:
    return html.escape(text or "")


_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>traceguard report</title><style>
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table.summary { border-collapse: collapse; margin: 1em 2em 1em 0; display: inline-table; vertical-align: top; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
td.n { text-align: right; }
svg { border: 1px solid #ddd; background: #fff; display: block; margin: .5em 0; }
svg text { font-size: 11px; fill: #333; }
rect.span { fill: #7aa6d8; } rect.anomalous { fill: #d9534f; }
rect.baseline { fill: #5cb85c; opacity: .2; }
polyline { fill: none; stroke-width: 1.5; } polyline.p50, b.p50 { stroke: #337ab7; color: #337ab7; }
polyline.p95, b.p95 { stroke: #f0ad4e; color: #f0ad4e; } line.onset { stroke: #d9534f; stroke-width: 2; }
ul.logs { font-family: monospace; font-size: 12px; }
</style></head><body>"""
