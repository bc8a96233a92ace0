"""Log templates per service and how often each is normally seen.

Templates are mined with drain3's Drain (a fixed-depth parse tree; lines
that differ only in their variable tokens share a cluster). Before mining,
the variable parts a real log line carries are masked: UUIDs, hex ids,
IP addresses, URLs' ids, numbers and timestamps, so ``user 17 from
10.0.0.1`` and ``user 18 from 10.0.0.2`` are one template. Only a line's
first line is mined (an exception's "type: message", not its stack trace),
cut to ``max_line``; a masked line seen before keeps the template it got
(the tree search is most of the cost, and most lines repeat once masked), and
a head seen before is not masked again. Severity is never read: it is often missing or wrong.

Frequencies are per service: each template's share of the service's lines,
decayed over ``half_life``. The lines of a rare template, or of one far
above its share, do not join the baseline (``TemplateModel.close_window``),
so a burst of a new exception is not learned as normal while it lasts; a
template that has shown up so in ``accept_after`` worth of windows is the
new normal. A known template (not rare) that stays far above its share for
``jump_windows`` windows in a row is a rate jump (``TemplateJump``): a
stage-level change on the stage that wrote most of its lines, open until as
many windows in a row without the burst. The miner's state is saved as JSON (template tokens, sizes),
nothing pickled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from drain3.drain import Drain, LogCluster

from traceguard.config import TemplatesConfig

_MASKS = [(re.compile(pattern), token) for pattern, token in (
    (r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", "<UUID>"),
    (r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?", "<TS>"),
    (r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b", "<IP>"),
    (r"\b0x[0-9a-fA-F]+\b|\b[0-9a-fA-F]{8,}\b", "<HEX>"),
    (r"[-+]?\b\d+(?:\.\d+)?\b", "<NUM>"),
)]


def masked_head(body: str, limit: int) -> str:
    """The first line of ``body``, cut to ``limit``, with its variable parts masked."""
    head = body.split("\n", 1)[0][:limit]
    for pattern, token in _MASKS:
        head = pattern.sub(token, head)
    return head


_SEEN_LINES = 4096  # masked lines remembered per service with their template: most lines repeat
_EXEMPLARS = 5
_STAGES = 8  # stages counted per template and window (a template written everywhere names its first ones)

Stage = tuple[str, str, int]


@dataclass
class _Where:
    """Which stages wrote a template's lines in a window, a few of their traces, and
    when the first was written (event time: lines are counted when their trace is
    decided, a decision wait later)."""

    stages: dict[Stage, int] = field(default_factory=dict)
    traces: list[str] = field(default_factory=list)
    first: int | None = None

    def add(self, stage: Stage, trace_id: str, time: int) -> None:
        if self.first is None or 0 < time < self.first:
            self.first = time
        if stage in self.stages or len(self.stages) < _STAGES:
            self.stages[stage] = self.stages.get(stage, 0) + 1
        if len(self.traces) < _EXEMPLARS and trace_id not in self.traces:
            self.traces.append(trace_id)

    def update(self, other: "_Where") -> None:
        if self.first is None:
            self.first = other.first
        for stage, lines in other.stages.items():
            if stage in self.stages or len(self.stages) < _STAGES:
                self.stages[stage] = self.stages.get(stage, 0) + lines
        self.traces.extend(t for t in other.traces[: _EXEMPLARS - len(self.traces)] if t not in self.traces)


@dataclass
class TemplateJump:
    """A known template far above its share for windows in a row: opened once, then
    updated and resolved under the same ``onset``."""

    service: str
    template_id: int
    template: str
    onset: int                  # event time of the burst's first line
    baseline_share: float       # the template's share of its service's lines before it
    baseline_lines: float       # the service's baseline lines (decayed)
    lines: int = 0              # the template's lines since the onset
    service_lines: int = 0      # the service's lines since the onset
    windows: int = 0            # windows of the burst
    calm: int = 0               # windows in a row without it, since the last
    where: _Where = field(default_factory=_Where)
    opened_at: int | None = None
    resolved_at: int | None = None

    @property
    def stage(self) -> Stage:
        """The stage that wrote most of its lines (first of equals in sorted order: replays agree)."""
        stages = self.where.stages
        return min(stages, key=lambda stage: (-stages[stage], stage)) if stages else (self.service, "", 0)

    @property
    def share(self) -> float:
        return self.lines / self.service_lines if self.service_lines else 0.0


@dataclass
class ServiceTemplates:
    miner: Drain
    seen: dict[str, int] = field(default_factory=dict)      # masked line -> template id (bounded)
    counts: dict[int, float] = field(default_factory=dict)  # baseline lines per template (decayed)
    total: float = 0.0                                      # baseline lines of the service
    window: dict[int, int] = field(default_factory=dict)    # lines per template in the current window
    window_total: int = 0
    raised: dict[int, int] = field(default_factory=dict)    # template -> windows in a row it was held out
    where: dict[int, _Where] = field(default_factory=dict)  # template -> who wrote it in the current window
    jumps: dict[int, TemplateJump] = field(default_factory=dict)  # known templates in a burst


class TemplateModel:
    """Templates of every service (bounded), their baselines and the current window."""

    def __init__(self, config: TemplatesConfig, rare: float) -> None:
        """``rare``: the share of a service's lines below which a template is rare."""
        self.config = config
        self.rare = rare
        self.services_: dict[str, ServiceTemplates] = {}
        self._decay = 0.5 ** (config.window / config.half_life) if config.half_life else 1.0
        self._accept_windows = max(1, config.accept_after // config.window)
        self.index_ = -1
        self.untracked_lines_ = 0
        self.changes_: list[TemplateJump] = []  # jumps opened, updated or resolved, until taken
        self._masked: dict[str, str] = {}  # a line's head -> masked_head of it, up to max_templates heads

    def _miner(self) -> Drain:
        return Drain(depth=4, sim_th=0.4, max_children=100, max_clusters=self.config.max_templates)

    def template(self, service: str, body: str, stage: Stage | None = None, trace_id: str = "",
                 time: int = 0) -> tuple[int, str] | None:
        """Mines one line: (template id, template text), None past ``max_services``.
        ``stage`` (of the span that wrote it), ``trace_id`` and ``time`` say where and
        when a rate jump is."""
        templates = self.services_.get(service)
        if templates is None:
            if len(self.services_) >= self.config.max_services:
                self.untracked_lines_ += 1
                return None
            templates = self.services_[service] = ServiceTemplates(self._miner())
        head = body.split("\n", 1)[0][: self.config.max_line]
        line = self._masked.get(head)
        if line is None:  # five regular expressions per line were a fifth of the log path; many lines repeat exactly
            if len(self._masked) >= self.config.max_templates:
                self._masked.clear()
            line = self._masked[head] = masked_head(head, self.config.max_line)
        cluster_id = templates.seen.get(line)
        cluster = templates.miner.id_to_cluster.get(cluster_id) if cluster_id is not None else None
        if cluster is None:  # a line not seen in this form (or whose template the miner forgot): mined
            cluster, _ = templates.miner.add_log_message(line)
            if len(templates.seen) >= _SEEN_LINES:
                templates.seen.clear()
            templates.seen[line] = cluster.cluster_id
        template_id = cluster.cluster_id
        templates.window[template_id] = templates.window.get(template_id, 0) + 1
        templates.window_total += 1
        if stage is not None:
            where = templates.where.get(template_id)
            if where is None:
                where = templates.where[template_id] = _Where()
            where.add(stage, trace_id, time)
        return template_id, cluster.get_template()

    def share(self, service: str, template_id: int) -> float | None:
        """The template's baseline share of its service's lines; None while the
        service has fewer than ``min_lines`` baseline lines (not judged yet)."""
        templates = self.services_.get(service)
        if templates is None or templates.total < self.config.min_lines:
            return None
        return templates.counts.get(template_id, 0.0) / templates.total

    def advance(self, now: int) -> None:
        """Closes the window once ``now`` (pipeline time) is past it."""
        index = now // self.config.window
        if index > self.index_:
            if self.index_ >= 0:
                for service in sorted(self.services_):  # sorted: changes come out in an order replays agree on
                    self.close_window(service, self.services_[service], now)
            self.index_ = index

    def take_changes(self) -> list[TemplateJump]:
        changes, self.changes_ = self.changes_, []
        return changes

    def close_window(self, service: str, templates: ServiceTemplates, now: int) -> None:
        """The window's lines join the baseline, but for templates that are rare
        (below ``rare``) or far above their share (a burst): those are held out
        until they have shown up in ``accept_after`` worth of windows (then they
        are the new normal). A burst of a known template is a rate jump."""
        decay, total = self._decay, templates.total
        held = 0
        judged = total >= self.config.min_lines
        bursting: set[int] = set()
        for template_id, lines in templates.window.items():
            share = templates.counts.get(template_id, 0.0) / total if total else 0.0
            expected = share * templates.window_total
            burst = lines >= 3 and lines > 2 * expected + 4 * math.sqrt(max(expected, 1.0))
            raised = share < self.rare or burst
            if burst and judged and share >= self.rare:
                bursting.add(template_id)
                self._burst(service, templates, template_id, share, lines, now)
            if raised and judged:
                windows = templates.raised[template_id] = templates.raised.get(template_id, 0) + 1
                if windows < self._accept_windows:
                    held += lines
                    continue
            templates.raised.pop(template_id, None)
            templates.counts[template_id] = templates.counts.get(template_id, 0.0) * decay + lines
        for template_id in list(templates.counts):
            if template_id not in templates.window:
                templates.counts[template_id] *= decay
        for template_id in [t for t in templates.jumps if t not in bursting]:
            jump = templates.jumps[template_id]
            jump.calm += 1
            if jump.opened_at is None or jump.calm >= self.config.jump_windows:  # as many calm windows as it took
                del templates.jumps[template_id]
                if jump.opened_at is not None:
                    jump.resolved_at = now
                    self.changes_.append(jump)
        templates.total = total * decay + templates.window_total - held
        templates.window, templates.window_total, templates.where = {}, 0, {}
        if len(templates.counts) > 4 * self.config.max_templates:  # templates the miner forgot
            live = templates.miner.id_to_cluster
            templates.counts = {k: v for k, v in templates.counts.items() if k in live}

    def _burst(self, service: str, templates: ServiceTemplates, template_id: int, share: float, lines: int,
               now: int) -> None:
        """One more window of a known template's burst: opens its jump after ``jump_windows`` of them."""
        jump = templates.jumps.get(template_id)
        where = templates.where.get(template_id)
        if jump is None:
            cluster = templates.miner.id_to_cluster.get(template_id)
            onset = where.first if where is not None and where.first else self.index_ * self.config.window
            jump = templates.jumps[template_id] = TemplateJump(
                service, template_id, cluster.get_template() if cluster is not None else "",
                onset=onset, baseline_share=share, baseline_lines=templates.total)
        jump.lines += lines
        jump.service_lines += templates.window_total
        jump.windows += 1
        jump.calm = 0
        if where is not None:
            jump.where.update(where)
        if jump.windows >= self.config.jump_windows:
            if jump.opened_at is None:
                jump.opened_at = now
            self.changes_.append(jump)

    def state(self) -> dict:
        """JSON-ready: per service its templates (id, tokens, mined lines, baseline lines),
        total, and the rate jumps in progress (an open one must resolve after a restart)."""
        return {service: {"total": t.total, "templates": [
            [c.cluster_id, list(c.log_template_tokens), c.size, t.counts.get(c.cluster_id, 0.0)]
            for c in t.miner.clusters], "jumps": [_jump_state(jump) for jump in t.jumps.values()]}
            for service, t in self.services_.items()}

    def restore(self, state: dict) -> None:
        for service, saved in state.items():
            templates = self.services_[str(service)] = ServiceTemplates(self._miner(), total=float(saved["total"]))
            miner = templates.miner
            for cluster_id, tokens, size, baseline in saved["templates"]:
                cluster = LogCluster([str(token) for token in tokens], int(cluster_id))
                cluster.size = int(size)
                miner.id_to_cluster[cluster.cluster_id] = cluster
                miner.add_seq_to_prefix_tree(miner.root_node, cluster)
                miner.clusters_counter = max(miner.clusters_counter, cluster.cluster_id)
                if baseline:
                    templates.counts[cluster.cluster_id] = float(baseline)
            for saved_jump in saved.get("jumps", []):
                jump = _restored_jump(str(service), saved_jump)
                templates.jumps[jump.template_id] = jump


def _jump_state(jump: TemplateJump) -> dict:
    return {"template_id": jump.template_id, "template": jump.template, "onset": jump.onset,
            "baseline_share": jump.baseline_share, "baseline_lines": jump.baseline_lines, "lines": jump.lines,
            "service_lines": jump.service_lines, "windows": jump.windows, "calm": jump.calm,
            "opened_at": jump.opened_at, "stages": [[*stage, lines] for stage, lines in jump.where.stages.items()],
            "traces": jump.where.traces, "first": jump.where.first}


def _restored_jump(service: str, saved: dict) -> TemplateJump:
    where = _Where({(str(s), str(o), int(k)): int(n) for s, o, k, n in saved["stages"][:_STAGES]},
                   [str(t) for t in saved["traces"][:_EXEMPLARS]], saved["first"])
    opened_at = saved["opened_at"]
    return TemplateJump(service, int(saved["template_id"]), str(saved["template"]), int(saved["onset"]),
                        float(saved["baseline_share"]), float(saved["baseline_lines"]), int(saved["lines"]),
                        int(saved["service_lines"]), int(saved["windows"]), int(saved["calm"]), where,
                        None if opened_at is None else int(opened_at))
