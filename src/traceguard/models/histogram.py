"""LogHistogram: a latency distribution in constant memory.

Durations are counted in fixed bins of ln(ns) that are 0.1 wide (≈ 10.5 %
apart) from 1 µs to about 7 h; quantiles interpolate within a bin. Counts are
floats so old samples can be decayed instead of forgotten all at once.
"""

from __future__ import annotations

import numpy as np

LOG_LOW = np.log(1_000.0)  # 1 µs in ns
BIN_WIDTH = 0.1
BINS = 240
_CENTRES = LOG_LOW + (np.arange(BINS) + 0.5) * BIN_WIDTH


class LogHistogram:
    __slots__ = ("counts_",)

    def __init__(self, counts: np.ndarray | None = None) -> None:
        self.counts_ = np.zeros(BINS) if counts is None else np.asarray(counts, dtype=float)
        if self.counts_.shape != (BINS,):
            raise ValueError(f"a LogHistogram has {BINS} bins, got {self.counts_.shape}")

    @property
    def total(self) -> float:
        return float(self.counts_.sum())

    def add_logs(self, logs: np.ndarray) -> None:
        """Adds samples given as ln(nanoseconds)."""
        # minimum/maximum, not np.clip: its wrappers cost more than the work on a window's samples
        index = np.minimum(np.maximum(((logs - LOG_LOW) / BIN_WIDTH).astype(np.int64), 0), BINS - 1)
        self.counts_ += np.bincount(index, minlength=BINS)

    def decay(self, factor: float) -> None:
        self.counts_ *= factor

    def quantiles(self, qs) -> np.ndarray:
        """Quantiles in ln(ns), linear within a bin; NaN when empty. (A handful of
        quantiles per call, each finished in Python floats: numpy's per-call cost,
        not the 240 bins, was the time. Same arithmetic, same values.)"""
        counts = self.counts_
        total = counts.sum()
        if total <= 0:
            return np.full(np.shape(qs), np.nan)
        cumulative = np.cumsum(counts)
        targets = np.multiply(qs, total)
        found = []
        for target, index in zip(targets.tolist(), np.searchsorted(cumulative, targets, side="left").tolist()):
            index = min(index, BINS - 1)
            count = counts.item(index)
            within = 0.0
            if count > 0:
                before = cumulative.item(index - 1) if index > 0 else 0.0
                within = min(max((target - before) / count, 0.0), 1.0)
            found.append(LOG_LOW + (index + within) * BIN_WIDTH)
        return np.array(found)

    def share_above(self, cut: float) -> float:
        """Share of the samples above ``cut`` (in ln(ns)), uniform within a bin."""
        total = self.counts_.sum()
        if total <= 0:
            return float("nan")
        position = min(max((cut - LOG_LOW) / BIN_WIDTH, 0.0), float(BINS))
        index = int(position)
        above = self.counts_[index + 1:].sum() + (self.counts_[index] * (1 + index - position) if index < BINS else 0.0)
        return float(above / total)

    def top(self, floor: float = 0.5) -> float:
        """Upper edge, in ln(ns), of the highest bin holding at least ``floor``
        (decayed) samples: the most this distribution has done; NaN when empty."""
        filled = np.flatnonzero(self.counts_ >= floor)
        return float(LOG_LOW + (filled[-1] + 1) * BIN_WIDTH) if filled.size else float("nan")

    def mean_excess(self, cut: float) -> float:
        """Mean of (value − ``cut``) over the samples above ``cut`` (a quantile, in
        ln(ns)): the scale of the tail beyond it (bin centres; at least one bin width)."""
        above = _CENTRES > cut
        weight = self.counts_[above].sum()
        if weight <= 0:
            return BIN_WIDTH
        return max(float((self.counts_[above] * (_CENTRES[above] - cut)).sum() / weight), BIN_WIDTH)
