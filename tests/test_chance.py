"""models.chance against scipy.stats, whose values it must give to the bit: a
regression or a burst is judged by comparing them with a bar, and a replay must
find what it found before."""

import math
import random

from scipy.stats import binom, norm, poisson

from traceguard.models import chance


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_the_tails_are_scipy_stats_to_the_bit():
    rng = random.Random(3)
    for _ in range(3_000):
        z = rng.choice([rng.uniform(-10, 40), rng.gauss(0, 3), 0.0, 3.72, 6.0])
        assert chance.normal_sf(z) == float(norm.sf(z)), z
        n = rng.choice([0, 1, 2, 7, rng.randrange(1, 5_000)])
        p = rng.choice([0.0, 1.0, rng.random(), rng.random() ** 8, 1e-12])
        k = rng.choice([-3, -1, 0, n - 1, n, n + 2, rng.randrange(-2, n + 3)])
        assert same(chance.binomial_sf(k, n, p), float(binom.sf(k, n, p))), (k, n, p)
        mu = rng.choice([0.0, 1e-9, rng.uniform(0, 3), rng.uniform(0, 500)])
        k = rng.choice([-2, -1, 0, 1, rng.randrange(0, 600)])
        assert same(chance.poisson_sf(k, mu), float(poisson.sf(k, mu))), (k, mu)
    # outside the distributions' parameters: nan, as scipy.stats says
    for k, n, p in ((1, 5, 1.5), (1, 5, -0.1), (1, 5, math.nan)):
        assert math.isnan(chance.binomial_sf(k, n, p)) and math.isnan(float(binom.sf(k, n, p)))
    assert math.isnan(chance.poisson_sf(1, -1.0)) and math.isnan(float(poisson.sf(1, -1.0)))
