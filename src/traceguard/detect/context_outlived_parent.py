"""``context_outlived_parent``: a synchronous child ended after its parent.

That is work that kept the request context after the request was over (a
goroutine/task/thread captured it). Messaging spans and spans with links are
exempt: outliving the request is what asynchronous work is for. Across
services, clocks disagree by a few ms, so the overrun must exceed the skew
tolerance; within one service, ``min_overrun``.
"""

from __future__ import annotations

import math

from traceguard.config import StructuralConfig
from traceguard.detect.base import finding, ms
from traceguard.records import KIND_CONSUMER, KIND_PRODUCER, Anomaly, AnomalyKind, Trace

_ASYNC_KINDS = frozenset({KIND_PRODUCER, KIND_CONSUMER})


class ContextOutlivedParent:
    kind = AnomalyKind.CONTEXT_OUTLIVED_PARENT

    def __init__(self, config: StructuralConfig) -> None:
        self._skew = config.clock_skew_tolerance
        self._min_overrun = config.min_overrun
        self._least_tolerance = min(self._skew, self._min_overrun)

    def detect(self, trace: Trace) -> list[Anomaly]:
        findings = []
        by_id = trace.by_id
        for child in trace.spans:
            if child.parent_span_id is None or child.kind in _ASYNC_KINDS or child.has_links:
                continue
            parent = by_id.get(child.parent_span_id)
            if parent is None:
                continue
            overrun = child.end - parent.end
            # nearly every child ends in time: one comparison rules it out
            if overrun <= self._least_tolerance or not parent.finished or not child.finished:
                continue
            tolerance = self._min_overrun if parent.service == child.service else self._skew
            if overrun <= tolerance:
                continue
            findings.append(finding(
                self.kind, trace.trace_id, child,
                detected_at=trace.decided_at,
                event_time=child.end,
                severity="warning",
                score=1.0 - math.exp(-overrun / 1e9),
                summary=(
                    f"{child.service} '{child.name}' kept running {ms(overrun)} ms after its parent "
                    f"{parent.service} '{parent.name}' ended: work held the request context after the request."
                ),
                evidence={
                    "parent_span_id": parent.span_id.hex(),
                    "parent_operation": parent.name,
                    "parent_end_unix_nano": parent.end,
                    "child_end_unix_nano": child.end,
                    "overrun_ms": ms(overrun),
                    "tolerance_ms": ms(tolerance),
                },
            ))
        return findings
