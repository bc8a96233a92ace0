"""How likely chance alone makes what a detector saw: the tail probabilities it tests against.

These are ``scipy.stats``' ``norm.sf``, ``binom.sf`` and ``poisson.sf``, computed
by the same ``scipy.special`` functions those distributions call, with the same
handling of the support, so every value is the same to the bit
(``tests/test_chance.py`` compares them). Importing ``scipy.stats`` took
1.2 s, more than half of a command's start-up, for these three.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, pdtrc

try:  # what binom.sf calls; private, so another scipy may not have it
    from scipy.special._ufuncs import _binom_sf
except ImportError:
    _binom_sf = None


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return float(ndtr(np.float64(-z)))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X > k) for X ~ Binomial(n, p)."""
    if _binom_sf is None:
        from scipy.stats import binom

        return float(binom.sf(k, n, p))
    if not (n >= 0 and 0 <= p <= 1):
        return math.nan
    if k < 0:
        return 1.0
    if k >= n:
        return 0.0
    return min(max(float(_binom_sf(np.float64(math.floor(k)), np.float64(n), np.float64(p))), 0.0), 1.0)


def poisson_sf(k: int, mu: float) -> float:
    """P(X > k) for X ~ Poisson(mu)."""
    if not mu >= 0:
        return math.nan
    if k < 0:
        return 1.0
    return min(max(float(pdtrc(np.float64(math.floor(k)), np.float64(mu))), 0.0), 1.0)
