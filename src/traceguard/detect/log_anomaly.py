"""``log_anomaly``: a trace carries a log line of a template its service (almost) never writes.

Every log record of a decided trace (OTLP log records and span events) is
mined into its service's templates (``models.templates``). A line whose
template's baseline share of the service's lines is below
``learned.alert_rate`` — never seen, or seen less than once in ten thousand
lines — is rare; a trace with rare lines is one finding, on the span of its
first rare line, naming each template with its lines and spans. A service is
judged once its baseline holds ``templates.min_lines`` lines. Neither
severity (often missing or wrong) nor the variable parts of a line (ids,
numbers, addresses, timestamps: masked before mining) matter.

A burst of a template is held out of the baseline while it lasts (up to
``templates.accept_after``), so every trace of a new exception is found. A
few such findings on one stage within a minute open an incident on it
(signal ``log_template``), before a failure rate can be sure; the stage's
``error_regression`` joins it, and later findings are attached to it.

A template the service writes routinely can jump too (a retry warning, a
cache miss, a timeout logged at INFO): one that stays far above its share
of the service's lines for ``templates.jump_windows`` windows is a
stage-level ``log_anomaly`` (``evidence.signal = "log_rate"``, on the stage
that wrote most of its lines), which opens or joins an incident and
resolves after as many windows in a row without the burst.
"""

from __future__ import annotations

import math

from traceguard.detect.base import finding, stage_finding, times, utc
from traceguard.models.templates import TemplateJump, TemplateModel
from traceguard.records import KIND_NAMES, Anomaly, AnomalyKind, LogRow, Trace

_SHOWN_LINES = 3  # lines quoted per template
_SHOWN_TEMPLATES = 5


def _log_order(log: LogRow) -> tuple:
    return log.time, log.span_id or b"", log.service, log.body


class LogAnomaly:
    kind = AnomalyKind.LOG_ANOMALY

    def __init__(self, model: TemplateModel) -> None:
        self.model = model
        self._rare = model.rare

    def detect(self, trace: Trace) -> list[Anomaly]:
        model = self.model
        model.advance(trace.decided_at)
        rare: dict[tuple[str, int], list] = {}  # (service, template id) -> [template, share, lines]
        by_id, root, trace_hex = trace.by_id, trace.root or trace.spans[0], trace.trace_id.hex()
        # mined in a fixed order: logs arrive in any order (a separate topic, stream
        # or file), and the order in which lines are mined shapes the templates
        for log in sorted(trace.logs, key=_log_order):
            span = by_id.get(log.span_id, root) if log.span_id else root
            mined = model.template(log.service, log.body, (span.service, span.name, span.kind), trace_hex, log.time)
            if mined is None:
                continue
            share = model.share(log.service, mined[0])
            if share is not None and share < self._rare:
                entry = rare.setdefault((log.service, mined[0]), [mined[1], share, []])
                entry[2].append(log)
        if not rare:
            return []
        templates = sorted(rare.items(), key=lambda item: (item[1][1], item[0]))  # rarest first
        first: LogRow = min((lines[0] for _, (_, _, lines) in templates), key=lambda log: log.time)
        span = trace.by_id.get(first.span_id) if first.span_id else None
        span = span or trace.root or trace.spans[0]
        (service, _), (text, share, lines) = templates[0]
        return [finding(
            self.kind, trace.trace_id, span,
            detected_at=trace.decided_at,
            event_time=first.time,
            severity="warning",
            score=min(1.0, 1.0 - share / self._rare),
            summary=(f"{service} logged a line it {'never writes' if share == 0 else 'almost never writes'}: "
                     f"'{text}'" + (f" (and {len(templates) - 1} more rare template(s))" if len(templates) > 1 else "")),
            evidence={"stage_kind": KIND_NAMES[span.kind], "templates": [
                {"service": svc, "template": template, "template_id": template_id, "baseline_share": round(s, 8),
                 "lines": [{"span_id": log.span_id.hex() if log.span_id else None,
                            "body": log.body.split("\n", 1)[0]} for log in logs[:_SHOWN_LINES]],
                 "count": len(logs)}
                for (svc, template_id), (template, s, logs) in templates[:_SHOWN_TEMPLATES]]},
        )]

    def advance(self, now: int) -> list[Anomaly]:
        """The rate jumps of the windows that ended (including those closed while detecting)."""
        self.model.advance(now)
        return self._jumps(now)

    def flush(self, now: int) -> list[Anomaly]:
        return self._jumps(now)

    def _jumps(self, now: int) -> list[Anomaly]:
        changes = {id(jump): jump for jump in self.model.take_changes()}  # a jump changed in several windows: once
        return [_jump_finding(jump, now) for jump in changes.values()]


def _jump_finding(jump: TemplateJump, now: int) -> Anomaly:
    """The stage-level finding of a rate jump: opened, updated and resolved under one id."""
    stage = jump.stage
    magnitude = round(jump.share / jump.baseline_share, 3)
    resolved = jump.resolved_at is not None
    return stage_finding(
        AnomalyKind.LOG_ANOMALY, stage, f"log_rate|{jump.service}|{jump.template_id}|{jump.onset}",
        detected_at=now,
        event_time=jump.onset,
        severity="critical" if magnitude >= 10 else "warning",
        score=min(1.0, math.log(max(magnitude, 1.0)) / math.log(100)),
        summary=(f"{jump.service} writes '{jump.template}' {times(magnitude)} as often as usual: {jump.share:.2%} of its "
                 f"lines ({jump.lines} of {jump.service_lines}) since {utc(jump.onset)}, usually "
                 f"{jump.baseline_share:.2%}" + ("; it is back to normal." if resolved else ".")),
        evidence={
            "state": "resolved" if resolved else "open",
            "signal": "log_rate",
            "stage_kind": KIND_NAMES[stage[2]],
            "onset_unix_nano": jump.onset,
            "opened_at_unix_nano": jump.opened_at,
            "resolved_at_unix_nano": jump.resolved_at,
            "magnitude": magnitude,
            "baseline_rate": round(jump.baseline_share, 8),
            "baseline_lines": round(jump.baseline_lines, 1),
            "current_rate": round(jump.share, 8),
            "current_lines": jump.lines,
            "current_service_lines": jump.service_lines,
            "templates": [{"service": jump.service, "template": jump.template, "template_id": jump.template_id}],
        },
        exemplars=list(jump.where.traces),
    )
