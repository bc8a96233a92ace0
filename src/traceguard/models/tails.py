"""Where a distribution's tail reaches a given rarity: the bar of the per-trace kinds.

``learned.alert_rate`` is a budget of findings per trace, far rarer than any
quantile a baseline can measure (a p99.99 needs ~10^5 samples to be seen at
all). So the tail is extrapolated: beyond its p99 it is taken to be
exponential in log time — a Pareto tail in linear time, the heavy tail real
latencies have; a log-normal one is lighter, so the bar errs high — with the
mean excess over p99 as its scale. The mean of the top 1 % is far steadier
than a p99.9 read from a handful of samples.
"""

from __future__ import annotations

import math

import numpy as np

# A trace has several stages and features; the budget is shared among them.
SHARE = 10


def exponential_tail(q99, mean_excess, rate: float):
    """The value exceeded with probability ``rate`` (< 1 %) by a tail that is
    exponential beyond ``q99`` with ``mean_excess``; arrays work element-wise."""
    return q99 + np.asarray(mean_excess) * math.log(0.01 / min(rate, 0.01))
