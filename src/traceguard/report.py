"""The replay report: the web view's pages in one self-contained HTML file.

``ReportCollector`` is a sink of the pipeline and hears of every trace worth
keeping (``keep_trace``). It keeps what the pages show, bounded whatever the
input's size: every incident (last state) and stage-level finding (few), the
``max_findings`` most severe per-trace findings with the spans of their traces
(the less severe ones are counted), the spans of incidents' exemplar traces
(up to ``max_exemplars``), and the counts by kind. ``render`` inlines
them, with the stages' latency and error series the pipeline recorded, into
the same page, script and style the live view serves (``traceguard.web``).
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
from collections import Counter
from pathlib import Path
from typing import Any

from traceguard import web
from traceguard.config import UiConfig
from traceguard.models.series import StageSeries
from traceguard.records import Anomaly, Incident, Trace, trace_view

_SEVERITY = {"critical": 2, "warning": 1, "info": 0}


class ReportCollector:
    def __init__(self, trace_spans: int, max_findings: int = 300, max_exemplars: int = 100) -> None:
        self.trace_spans = trace_spans
        self.max_findings = max_findings
        self.max_exemplars = max_exemplars
        self._exemplars: dict[str, dict[str, Any]] = {}
        self.by_kind: Counter = Counter()
        self.stage_findings: dict[str, Anomaly] = {}  # by id: a resolved regression replaces its open version
        self.incidents: dict[str, Incident] = {}       # by id, last state
        # the most severe per-trace findings: a min-heap of (severity, score, -arrival, finding)
        self._kept: list[tuple[int, float, int, Anomaly]] = []
        self._arrival = itertools.count()
        self._traces: dict[str, dict[str, Any]] = {}   # views of the traces of kept findings
        self._references: Counter = Counter()          # kept findings per trace
        self._last: Trace | None = None                # the trace whose findings are being emitted

    # -- sink ----------------------------------------------------------------
    def keep_trace(self, trace: Trace, exemplar: bool) -> None:
        """An exemplar's spans are kept; a flagged trace's findings come next, and
        its spans are kept if one of them is."""
        if not exemplar:
            self._last = trace
        elif len(self._exemplars) < self.max_exemplars:
            self._exemplars[trace.trace_id.hex()] = trace_view(trace, self.trace_spans)

    def emit(self, anomaly: Anomaly) -> None:
        if anomaly.trace_id is None:
            if anomaly.id not in self.stage_findings:
                self.by_kind[anomaly.kind.value] += 1
            self.stage_findings[anomaly.id] = anomaly
            return
        self.by_kind[anomaly.kind.value] += 1
        entry = (_SEVERITY.get(anomaly.severity, 0), anomaly.score, -next(self._arrival), anomaly)
        if len(self._kept) < self.max_findings:
            heapq.heappush(self._kept, entry)
        elif entry[:3] > self._kept[0][:3]:
            self._release(heapq.heapreplace(self._kept, entry)[3])
        else:
            return
        trace_id = anomaly.trace_id
        self._references[trace_id] += 1
        last = self._last
        if trace_id not in self._traces and last is not None and last.trace_id.hex() == trace_id:
            self._traces[trace_id] = trace_view(last, self.trace_spans)

    def _release(self, anomaly: Anomaly) -> None:
        self._references[anomaly.trace_id] -= 1
        if not self._references[anomaly.trace_id]:
            del self._references[anomaly.trace_id]
            self._traces.pop(anomaly.trace_id, None)

    def emit_incident(self, incident: Incident) -> None:
        self.incidents[incident.id] = incident

    def flush(self) -> None:
        """Nothing to make durable: the report is written at the end."""

    def close(self) -> None:
        """Rendering is the front end's call."""

    # -- rendering -------------------------------------------------------------
    def data(self, series: StageSeries) -> dict[str, Any]:
        """What the page shows, JSON-ready: the stages' series are those of the
        stages the findings and incidents name."""
        findings = [entry[3] for entry in self._kept] + list(self.stage_findings.values())
        stages = {(f.service, f.operation) for f in findings if f.service}
        stages |= {(s.service, s.operation) for i in self.incidents.values() for s in (*i.culprits, *i.affected)}
        return {
            "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
            "counts": dict(sorted(self.by_kind.items())),
            "incidents": [i.model_dump(mode="json") for i in self.incidents.values()],
            "findings": [f.model_dump(mode="json") for f in findings],
            "traces": {**self._exemplars, **self._traces},
            "series": [entry for service, operation in sorted(stages) for entry in series.of(service, operation)],
        }

    def render(self, path: Path, series: StageSeries, ui: UiConfig) -> None:
        path.write_text(web.report_page(self.data(series), ui), encoding="utf-8")
