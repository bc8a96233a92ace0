"""Learned estimators: latency baselines, trace structure, isolation forests.

They hold state and numbers, never findings: the detectors in ``detect/``
turn what they say into anomalies. ``Models`` is the unit that is saved to
and loaded from a model directory (``models.store``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from traceguard.config import LearnedConfig
from traceguard.models.forest import ForestModel
from traceguard.models.latency import LatencyModel, PodLatency
from traceguard.models.structure import StructureModel
from traceguard.models.templates import TemplateModel


@dataclass
class Models:
    latency: LatencyModel
    structure: StructureModel
    forest: ForestModel
    templates: TemplateModel
    # the learned rates of the detectors that keep them (a stage's failures, its
    # outlived children, its calls), JSON-ready and keyed by kind: the pipeline
    # writes them before a save (``Pipeline.models_for_saving``) and reads them at start
    rates: dict[str, dict] = field(default_factory=dict)
    pod_latency: PodLatency | None = None  # learned.latency.per_pod

    @classmethod
    def new(cls, config: LearnedConfig) -> "Models":
        latency = LatencyModel(config.latency, config.alert_rate)
        return cls(latency, StructureModel(config.structure), ForestModel(config.forest, config.alert_rate),
                   TemplateModel(config.templates, config.alert_rate),
                   pod_latency=PodLatency(config.latency, latency) if config.latency.per_pod else None)
