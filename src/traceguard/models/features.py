"""Per-trace values the learned detectors share, computed once per trace."""

from __future__ import annotations

from traceguard.native import in_c
from traceguard.records import KIND_CLIENT, KIND_NETWORK, KIND_SERVER, STATUS_ERROR, Span, Trace

Stage = tuple[str, str, int]  # (service, operation, span kind)


def stages(trace: Trace) -> list[Stage]:
    """Each span's stage, in span order: made when the trace is expanded (in C);
    computed here for a trace built another way."""
    cached = trace.derived.get("stages")
    if cached is None:
        cached = trace.derived["stages"] = [(s.service, s.name, s.kind) for s in trace.spans]
    return cached


def failed(trace: Trace) -> list[Span]:
    """The spans with status ERROR, in span order: made when the trace is expanded
    (in C); computed here for a trace built another way."""
    cached = trace.derived.get("failed")
    if cached is None:
        cached = trace.derived["failed"] = [s for s in trace.spans if s.status == STATUS_ERROR]
    return cached


def self_times(trace: Trace) -> list[int | None]:
    """Each span's duration minus the time its children cover (None if unfinished),
    made once per trace, in C where it is built.

    Self time points at the guilty stage: a parent that is slow only because
    a child is slow keeps its self time. Children are clipped to the parent,
    so asynchronous children after the parent's end cover nothing.
    """
    cached = trace.derived.get("self_times")
    if cached is None:
        cached = trace.derived["self_times"] = in_c("self_times", span_self_times, trace.spans, trace.children)
    return cached


def span_self_times(spans: list[Span], children: dict[bytes, list[Span]]) -> list[int | None]:
    """``self_times`` in Python: the reference for ``_rows.self_times``, and the
    code where it is not built."""
    out: list[int | None] = []
    for span in spans:
        if not span.finished:
            out.append(None)
            continue
        kids = children.get(span.span_id)
        if not kids:
            out.append(span.end - span.start)
            continue
        if len(kids) == 1:  # the common case, without the sort
            kid = kids[0]
            covered = min(kid.end, span.end) - max(kid.start, span.start) if kid.finished else 0
            out.append(span.end - span.start - max(covered, 0))
            continue
        covered = 0
        cursor = span.start
        for start, end in sorted((max(c.start, span.start), min(c.end, span.end)) for c in kids if c.finished):
            if end <= cursor or start >= end:  # nothing left of it within the span
                continue
            covered += end - max(start, cursor)
            cursor = end
        out.append(span.end - span.start - covered)
    return out


_NETWORK_FROM = " <- "


def network_stage(callee_service: str, callee_operation: str, caller_service: str) -> Stage:
    """The network path of calls from ``caller_service`` into a callee's operation."""
    return callee_service, f"{callee_operation}{_NETWORK_FROM}{caller_service}", KIND_NETWORK


def network_parts(stage: Stage) -> tuple[str, str] | None:
    """(callee operation, calling service) of a ``network_stage``; None for any other stage."""
    if stage[2] != KIND_NETWORK:
        return None
    operation, _, caller = stage[1].rpartition(_NETWORK_FROM)
    return operation, caller


def latency_keys(trace: Trace) -> list[Stage]:
    """The stage each span's ``latency_samples`` value belongs to (see there):
    its own, or for a CLIENT span with its callee in the trace, the callee's
    ``network_stage``. Cheap: no self time is computed."""
    cached = trace.derived.get("latency_keys")
    if cached is None:
        cached = trace.derived["latency_keys"] = in_c("latency_keys", span_latency_keys, trace.spans,
                                                       trace.children, stages(trace))
    return cached


def span_latency_keys(spans: list[Span], children: dict[bytes, list[Span]], keys: list[Stage]) -> list[Stage]:
    """``latency_keys`` from each span's stage (``keys``, itself if no span has a
    callee): the reference for ``_rows.latency_keys``."""
    return _replaced(keys, {i: network_stage(callee.service, callee.name, span.service)
                            for i, span, callee in _calls(spans, children)})


def _calls(spans: list[Span], children: dict[bytes, list[Span]]):
    """(index, span, callee) of each finished CLIENT span whose callee is in the trace."""
    for i, span in enumerate(spans):
        if span.kind == KIND_CLIENT and span.finished:
            callee = callee_of(span, children)
            if callee is not None:
                yield i, span, callee


def _replaced(values: list, changes: dict[int, object]) -> list:
    """``values`` with ``changes`` (index: value) made in a copy; ``values`` itself without any."""
    if not changes:
        return values
    out = list(values)
    for i, value in changes.items():
        out[i] = value
    return out


def callee_of(span, children):
    """A CLIENT span's callee: its SERVER child in another service (finished), or None."""
    for child in children.get(span.span_id, ()):
        if child.kind == KIND_SERVER and child.service != span.service and child.finished:
            return child
    return None


def latency_samples(trace: Trace) -> list[int | None]:
    """Each span's time as the latency baselines judge it: its self time, except
    for a CLIENT span whose callee's SERVER span (another service) is in the trace.

    Such a client's self time is the network plus the clock skew between the
    two services, so it shifts whenever the clocks drift. Its duration minus
    the callee's duration is the network and queueing time alone — two
    durations, each on one clock, so skew cancels — and belongs to the callee:
    it is judged as the callee's ``network_stage`` (a delayed network to a
    pod is that pod's fault), while the callee's own time counts on its SERVER
    stage. None where a span is unfinished.
    """
    cached = trace.derived.get("latency_samples")
    if cached is None:
        cached = trace.derived["latency_samples"] = in_c("latency_samples", span_latency_samples, trace.spans,
                                                          trace.children, self_times(trace))
    return cached


def span_latency_samples(spans: list[Span], children: dict[bytes, list[Span]],
                         samples: list[int | None]) -> list[int | None]:
    """``latency_samples`` from each span's self time (``samples``, itself if no
    span has a callee): the reference for ``_rows.latency_samples``."""
    return _replaced(samples, {i: max(0, (span.end - span.start) - (callee.end - callee.start))
                               for i, span, callee in _calls(spans, children)})


def shape(trace: Trace) -> dict[str, float]:
    """Shape features of a rooted trace: size, depth, fan-out, errors, services, repeats."""
    cached = trace.derived.get("shape")
    if cached is not None:
        return cached
    depth, fan_out, services, repeated = in_c("shape", span_shape, trace.root, trace.spans, trace.children)
    out = {
        "span_count": float(len(trace.spans)),
        "depth": float(depth),
        "max_fan_out": float(fan_out),
        "errors": float(len(failed(trace))),
        "services": float(services),
        "max_repeated_calls": float(repeated),
    }
    trace.derived["shape"] = out
    return out


def span_shape(root: Span | None, spans: list[Span], children: dict[bytes, list[Span]]) -> tuple[int, int, int, int]:
    """(depth, max fan-out, services, max repeated calls) of ``shape``: the
    reference for ``_rows.shape``."""
    depth = 0
    frontier = [root] if root is not None else []
    while frontier:
        depth += 1
        frontier = [c for s in frontier for c in children.get(s.span_id, ())]
    fan_out = max((len(kids) for kids in children.values()), default=0)
    repeated = 0
    for kids in children.values():
        if len(kids) > 1:
            counts: dict[tuple, int] = {}
            for kid in kids:
                key = (kid.service, kid.name)
                counts[key] = counts.get(key, 0) + 1
            repeated = max(repeated, max(counts.values()))
    return depth, fan_out, len({s.service for s in spans}), repeated
