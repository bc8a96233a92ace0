"""Correlation: findings grouped into incidents, one per fault, the culprit stage first."""

from traceguard.correlate.incidents import IncidentTracker

__all__ = ["IncidentTracker"]
