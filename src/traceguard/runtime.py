"""Process-wide tuning the batch commands (``replay``, ``train``) apply once, at start.

The cyclic garbage collector's default starts a young-generation collection
every 700 new container objects. Decoding one OTLP/JSON request of 512 spans
makes about 10,000 (a dict per span, attribute and value), all of them garbage
a moment later; at 700 they are traversed by several collections while
still alive and promoted to older generations before they die, which cost as
much as the JSON walk itself (structural OTLP/JSON replay ≈ 2x faster at 50,000,
benchmarks/RESULTS.md).
What survives here is long-lived on purpose (spans in flight, models), and
``gc.freeze()`` keeps the objects made while importing (numpy, scikit-learn,
grpc, pydantic) out of every later full collection. Reference counting still
frees everything that is not in a cycle at once; cycles wait at most one
young collection longer — which is why the long-running ``serve`` and
``consume`` keep the default: there the garbage cycles of request handling
(exceptions, frameworks) lingering for 50,000 allocations grew the RSS by
10.4 MiB in tests/test_serve.py's refusal test in one CI run (bound 8 MiB), for a receiver
whose measured rate met its target without the tuning.
"""

from __future__ import annotations

import functools
import gc

GC_YOUNG_THRESHOLD = 50_000


@functools.cache
def tune_gc() -> None:
    """Freezes what exists now and raises the young-generation threshold; once per
    process (a frozen object is never collected, so freezing again later would keep
    whatever garbage exists by then)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
