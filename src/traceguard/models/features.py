"""Per-trace values the learned detectors share, computed once per trace."""

from __future__ import annotations

from traceguard.records import KIND_CLIENT, KIND_PRODUCER, KIND_SERVER, KIND_CONSUMER, STATUS_ERROR, Trace

Stage = tuple[str, str, int]  # (service, operation, span kind)


def stages(trace: Trace) -> list[Stage]:
    """Each span's stage, in span order (computed once per trace)."""
    cached = trace.derived.get("stages")
    if cached is None:
        cached = trace.derived["stages"] = [(s.service, s.name, s.kind) for s in trace.spans]
    return cached


def self_times(trace: Trace) -> list[int | None]:
    """Each span's duration minus the time its children cover (None if unfinished).

    Self time points at the guilty stage: a parent that is slow only because
    a child is slow keeps its self time. Children are clipped to the parent,
    so asynchronous children after the parent's end cover nothing.
    """
    cached = trace.derived.get("self_times")
    if cached is not None:
        return cached
    out: list[int | None] = []
    children = trace.children
    for span in trace.spans:
        if not span.finished:
            out.append(None)
            continue
        kids = children.get(span.span_id)
        if not kids:
            out.append(span.end - span.start)
            continue
        covered = 0
        cursor = span.start
        for start, end in sorted((max(c.start, span.start), min(c.end, span.end)) for c in kids if c.finished):
            if end <= cursor:
                continue
            covered += end - max(start, cursor)
            cursor = end
        out.append(span.end - span.start - covered)
    trace.derived["self_times"] = out
    return out


_CALLEE_KINDS = frozenset({KIND_SERVER, KIND_CONSUMER})


def latency_samples(trace: Trace) -> list[int | None]:
    """Self times as the latency baselines judge them: None where a span is
    unfinished, or is a CLIENT/PRODUCER span whose callee is instrumented.

    Such a client's self time is the network plus the clock skew between the
    two services (a few ms either way on real systems), so it shifts whenever
    the clocks drift; the callee's own SERVER span carries the stage's real
    latency, and the callee's time counts there.
    """
    cached = trace.derived.get("latency_samples")
    if cached is not None:
        return cached
    out = list(self_times(trace))
    children = trace.children
    for i, span in enumerate(trace.spans):
        if span.kind == KIND_CLIENT or span.kind == KIND_PRODUCER:
            kids = children.get(span.span_id)
            if kids and any(k.kind in _CALLEE_KINDS and k.service != span.service for k in kids):
                out[i] = None
    trace.derived["latency_samples"] = out
    return out


def shape(trace: Trace) -> dict[str, float]:
    """Shape features of a rooted trace: size, depth, fan-out, errors, services, repeats."""
    cached = trace.derived.get("shape")
    if cached is not None:
        return cached
    depth = 0
    frontier = [trace.root] if trace.root is not None else []
    while frontier:
        depth += 1
        frontier = [c for s in frontier for c in trace.children.get(s.span_id, ())]
    fan_out = max((len(kids) for kids in trace.children.values()), default=0)
    repeated = 0
    for kids in trace.children.values():
        if len(kids) > 1:
            counts: dict[tuple, int] = {}
            for kid in kids:
                key = (kid.service, kid.name)
                counts[key] = counts.get(key, 0) + 1
            repeated = max(repeated, max(counts.values()))
    out = {
        "span_count": float(len(trace.spans)),
        "depth": float(depth),
        "max_fan_out": float(fan_out),
        "errors": float(sum(1 for s in trace.spans if s.status == STATUS_ERROR)),
        "services": float(len({s.service for s in trace.spans})),
        "max_repeated_calls": float(repeated),
    }
    trace.derived["shape"] = out
    return out
