"""``unfinished_span``: a span exported without a valid end time."""

from __future__ import annotations

from traceguard.detect.base import finding, ms
from traceguard.records import Anomaly, AnomalyKind, Trace


class UnfinishedSpan:
    kind = AnomalyKind.UNFINISHED_SPAN

    def detect(self, trace: Trace) -> list[Anomaly]:
        findings = []
        for span in trace.spans:
            if span.finished:
                continue
            problem = "end time is 0" if span.end == 0 else f"ends {ms(span.start - span.end)} ms before it starts"
            findings.append(finding(
                self.kind, trace.trace_id, span,
                detected_at=trace.decided_at,
                event_time=span.start,
                severity="warning",
                score=1.0,
                summary=f"{span.service} '{span.name}' was exported without a valid end: {problem}.",
                evidence={"start_time_unix_nano": span.start, "end_time_unix_nano": span.end, "problem": problem},
            ))
        return findings
