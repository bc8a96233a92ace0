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
"""

from __future__ import annotations

from traceguard.detect.base import finding
from traceguard.models.templates import TemplateModel
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
        # mined in a fixed order: logs arrive in any order (a separate topic, stream
        # or file), and the order in which lines are mined shapes the templates
        for log in sorted(trace.logs, key=_log_order):
            mined = model.template(log.service, log.body)
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
        self.model.advance(now)
        return []

    def flush(self, now: int) -> list[Anomaly]:
        return []
