"""Learned estimators: latency baselines, trace structure, isolation forests.

They hold state and numbers, never findings: the detectors in ``detect/``
turn what they say into anomalies. ``Models`` is the unit that is saved to
and loaded from a model directory (``models.store``).
"""

from __future__ import annotations

from dataclasses import dataclass

from traceguard.config import LearnedConfig
from traceguard.models.forest import ForestModel
from traceguard.models.latency import LatencyModel
from traceguard.models.structure import StructureModel


@dataclass
class Models:
    latency: LatencyModel
    structure: StructureModel
    forest: ForestModel

    @classmethod
    def new(cls, config: LearnedConfig) -> "Models":
        return cls(LatencyModel(config.latency, config.alert_rate), StructureModel(config.structure), ForestModel(config.forest, config.alert_rate))
