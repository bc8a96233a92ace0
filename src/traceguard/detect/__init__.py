"""Detectors: small units, each named by what it finds, run in a declared order."""

from __future__ import annotations

from traceguard.config import StructuralConfig
from traceguard.detect.base import TraceDetector
from traceguard.detect.context_outlived_parent import ContextOutlivedParent
from traceguard.detect.late_span import LateSpan
from traceguard.detect.missing_parent import MissingParent
from traceguard.detect.missing_root import MissingRoot
from traceguard.detect.unfinished_span import UnfinishedSpan
from traceguard.detect.unpaired_client_span import UnpairedClientSpan


def structural_detectors(config: StructuralConfig) -> list[TraceDetector]:
    """The structural checks, in the order their findings are emitted per trace.

    Order matters only for output order (it is part of byte-identical replay):
    whole-trace problems first, then per-span ones from broken to suspicious.
    """
    return [
        MissingRoot(),
        MissingParent(),
        UnfinishedSpan(),
        ContextOutlivedParent(config),
        UnpairedClientSpan(config),
    ]


__all__ = ["LateSpan", "TraceDetector", "structural_detectors"]
