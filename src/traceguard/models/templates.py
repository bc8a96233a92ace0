"""Log templates per service and how often each is normally seen.

Templates are mined with drain3's Drain (a fixed-depth parse tree; lines
that differ only in their variable tokens share a cluster). Before mining,
the variable parts a real log line carries are masked: UUIDs, hex ids,
IP addresses, URLs' ids, numbers and timestamps, so ``user 17 from
10.0.0.1`` and ``user 18 from 10.0.0.2`` are one template. Only a line's
first line is mined (an exception's "type: message", not its stack trace),
cut to ``max_line``; a masked line seen before keeps the template it got
(the tree search is most of the cost, and most lines repeat once masked). Severity is never read: it is often missing or wrong.

Frequencies are per service: each template's share of the service's lines,
decayed over ``half_life``. The lines of a rare template, or of one far
above its share, do not join the baseline (``TemplateModel.close_window``),
so a burst of a new exception is not learned as normal while it lasts; a
template that has shown up so in ``accept_after`` worth of windows is the
new normal. The miner's state is saved as JSON (template tokens, sizes),
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


@dataclass
class ServiceTemplates:
    miner: Drain
    seen: dict[str, int] = field(default_factory=dict)      # masked line -> template id (bounded)
    counts: dict[int, float] = field(default_factory=dict)  # baseline lines per template (decayed)
    total: float = 0.0                                      # baseline lines of the service
    window: dict[int, int] = field(default_factory=dict)    # lines per template in the current window
    window_total: int = 0
    raised: dict[int, int] = field(default_factory=dict)    # template -> windows in a row it was held out


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

    def _miner(self) -> Drain:
        return Drain(depth=4, sim_th=0.4, max_children=100, max_clusters=self.config.max_templates)

    def template(self, service: str, body: str) -> tuple[int, str] | None:
        """Mines one line: (template id, template text), None past ``max_services``."""
        templates = self.services_.get(service)
        if templates is None:
            if len(self.services_) >= self.config.max_services:
                self.untracked_lines_ += 1
                return None
            templates = self.services_[service] = ServiceTemplates(self._miner())
        line = masked_head(body, self.config.max_line)
        cluster_id = templates.seen.get(line)
        cluster = templates.miner.id_to_cluster.get(cluster_id) if cluster_id is not None else None
        if cluster is None:  # a line not seen in this form (or whose template the miner forgot): mined
            cluster, _ = templates.miner.add_log_message(line)
            if len(templates.seen) >= _SEEN_LINES:
                templates.seen.clear()
            templates.seen[line] = cluster.cluster_id
        templates.window[cluster.cluster_id] = templates.window.get(cluster.cluster_id, 0) + 1
        templates.window_total += 1
        return cluster.cluster_id, cluster.get_template()

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
                for templates in self.services_.values():
                    self.close_window(templates)
            self.index_ = index

    def close_window(self, templates: ServiceTemplates) -> None:
        """The window's lines join the baseline, but for templates that are rare
        (below ``rare``) or far above their share (a burst): those are held out
        until they have shown up in ``accept_after`` worth of windows (then they
        are the new normal)."""
        decay, total = self._decay, templates.total
        held = 0
        for template_id, lines in templates.window.items():
            share = templates.counts.get(template_id, 0.0) / total if total else 0.0
            expected = share * templates.window_total
            raised = share < self.rare or (lines >= 3 and lines > 2 * expected + 4 * math.sqrt(max(expected, 1.0)))
            if raised and total >= self.config.min_lines:
                windows = templates.raised[template_id] = templates.raised.get(template_id, 0) + 1
                if windows < self._accept_windows:
                    held += lines
                    continue
            templates.raised.pop(template_id, None)
            templates.counts[template_id] = templates.counts.get(template_id, 0.0) * decay + lines
        for template_id in list(templates.counts):
            if template_id not in templates.window:
                templates.counts[template_id] *= decay
        templates.total = total * decay + templates.window_total - held
        templates.window, templates.window_total = {}, 0
        if len(templates.counts) > 4 * self.config.max_templates:  # templates the miner forgot
            live = templates.miner.id_to_cluster
            templates.counts = {k: v for k, v in templates.counts.items() if k in live}

    def state(self) -> dict:
        """JSON-ready: per service its templates (id, tokens, mined lines, baseline lines) and total."""
        return {service: {"total": t.total, "templates": [
            [c.cluster_id, list(c.log_template_tokens), c.size, t.counts.get(c.cluster_id, 0.0)]
            for c in t.miner.clusters]} for service, t in self.services_.items()}

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
