"""Where a distribution's tail reaches a given rarity: the bar of the per-trace kinds.

``learned.alert_rate`` is a budget of findings per trace, far rarer than any
quantile a baseline can measure (a p99.99 needs ~10^5 samples to be seen at
all). So the tail is extrapolated: beyond a high quantile it is taken to be
exponential in log time — a Pareto tail in linear time, the heavy tail real
latencies have; a log-normal one is lighter, so the bar errs high — with the
mean excess over its top ~20 samples as its scale, taken at its upper
confidence bound. A mean of 20 samples is far steadier than a p99.9 read
from one or two.
"""

from __future__ import annotations

import math

import numpy as np

# No tail is estimated from fewer samples (its top 20 are then its top 2 %).
MIN_TAIL_SAMPLES = 1000
# A trace has several stages and features; the budget is shared among them.
SHARE = 10
# Samples the tail is measured over, and how far above its mean excess the bar
# takes it: an upper confidence bound (about two standard errors of a mean of
# 20 exponential samples), because the extrapolation multiplies any error.
TAIL_SAMPLES = 20
_UPPER = 1.0 + 2.0 / math.sqrt(TAIL_SAMPLES)


def tail_reference(samples: float) -> float:
    """The quantile the tail is measured from: the top ~20 samples, between p99
    and p99.9. A heavy component rarer than 1 % of calls (a Pareto tail on a
    few calls) barely moves the excess over p99, but dominates that over p99.9."""
    return min(0.999, max(0.99, 1.0 - TAIL_SAMPLES / max(samples, 1.0)))


def exponential_tail(reference_value, mean_excess, rate: float, reference: float = 0.99):
    """The value exceeded with probability ``rate`` by a tail that is exponential
    beyond ``reference_value`` (the ``reference`` quantile) with ``mean_excess``;
    arrays work element-wise."""
    beyond = 1.0 - reference
    return reference_value + _UPPER * np.asarray(mean_excess) * math.log(beyond / min(rate, beyond))
