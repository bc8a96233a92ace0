"""The structural per-trace detectors: each finds its fault on the exact span, then each one's own cases.
(The contract over every registered detector is tests/test_detector_contract.py.)"""

import pytest

from builders import MS, decide, row, sid, tid
from traceguard.assemble.assembler import to_span
from traceguard.config import PipelineConfig, StructuralConfig
from traceguard.detect import LateSpan, build
from traceguard.detect.base import duration, times
from traceguard.detect.context_outlived_parent import ContextOutlivedParent
from traceguard.detect.missing_parent import MissingParent
from traceguard.detect.missing_root import MissingRoot
from traceguard.detect.unfinished_span import UnfinishedSpan
from traceguard.detect.unpaired_client_span import UnpairedClientSpan
from traceguard.models import Models
from traceguard.records import (
    KIND_CLIENT, KIND_CONSUMER, KIND_PRODUCER, KIND_SERVER, STATUS_ERROR, AnomalyKind,
)

# No norm warm-up: each detector's own fault must be found on first sight.
CONFIG = StructuralConfig(unpaired_min_samples=3, norm_min_calls=0)
# the detectors whose findings are about one trace (error_regression's are about a stage: test_norms)
PER_TRACE = [d for d in build(PipelineConfig(structural=CONFIG), Models.new(PipelineConfig().learned))["completeness"]
             if d.kind not in (AnomalyKind.ERROR_REGRESSION, AnomalyKind.MISSING_EXPECTED_SPAN)]


def clean_trace(n: int = 1):
    """A healthy request with every decoy: a cross-service call with clock skew
    (server ends 8 ms after the client), a database call, an external API call,
    a failed connect retried, a Kafka consumer that ends after the root, and a
    span with a link that ends late."""
    return decide(
        row(n, 1, start_ms=0, end_ms=100, kind=KIND_SERVER, service="frontend", name="GET /"),
        row(n, 2, 1, start_ms=5, end_ms=50, kind=KIND_CLIENT, service="frontend", name="GET /cart"),
        row(n, 3, 2, start_ms=4, end_ms=58, kind=KIND_SERVER, service="cart", name="GET /cart"),
        row(n, 4, 3, start_ms=10, end_ms=20, kind=KIND_CLIENT, service="cart", name="GET k",
            attrs=(("db.system", "redis"),)),
        row(n, 5, 1, start_ms=51, end_ms=60, kind=KIND_CLIENT, service="frontend", name="POST /pay",
            attrs=(("server.address", "api.example"),)),
        row(n, 6, 1, start_ms=60, end_ms=61, kind=KIND_CLIENT, service="frontend", name="GET /cart",
            status=STATUS_ERROR),
        row(n, 7, 1, start_ms=62, end_ms=70, kind=KIND_PRODUCER, service="frontend", name="publish"),
        row(n, 8, 7, start_ms=300, end_ms=900, kind=KIND_CONSUMER, service="email", name="process"),
        row(n, 9, 8, start_ms=310, end_ms=890, kind=KIND_CLIENT, service="email", name="SMTP send"),
        row(n, 10, 1, start_ms=90, end_ms=5000, service="frontend", name="follow-up", links=True),
    )


# Each detector with a trace that has exactly its fault.
def _fault_traces():
    return {
        AnomalyKind.MISSING_ROOT: decide(row(1, 2, 1, end_ms=10), row(1, 3, 1, end_ms=10), row(1, 4, 2, end_ms=5)),
        AnomalyKind.MISSING_PARENT: decide(row(1, 1, end_ms=100), row(1, 3, 2, end_ms=10)),
        AnomalyKind.UNFINISHED_SPAN: decide(row(1, 1, end_ms=100), row(1, 2, 1, end_ms=None)),
        AnomalyKind.CONTEXT_OUTLIVED_PARENT: decide(row(1, 1, end_ms=100), row(1, 2, 1, end_ms=400)),
        AnomalyKind.UNPAIRED_CLIENT_SPAN: decide(
            row(1, 1, end_ms=100, kind=KIND_SERVER, service="frontend", name="GET /"),
            row(1, 2, 1, start_ms=5, end_ms=50, kind=KIND_CLIENT, service="frontend", name="GET /cart")),
    }


def _warm(detector):
    """Unpaired-client needs history that this call normally pairs."""
    for n in range(100, 105):
        detector.detect(clean_trace(n))
    return detector


@pytest.mark.parametrize("detector", PER_TRACE, ids=lambda d: d.kind.value)
def test_contract_clean_traces_raise_nothing(detector):
    _warm(detector)
    assert detector.detect(clean_trace()) == []


@pytest.mark.parametrize("detector", PER_TRACE, ids=lambda d: d.kind.value)
def test_contract_finds_its_own_fault_with_the_exact_span(detector):
    _warm(detector)
    trace = _fault_traces()[detector.kind]
    found = detector.detect(trace)
    assert [a.kind for a in found] == [detector.kind]
    (anomaly,) = found
    assert anomaly.trace_id == trace.trace_id.hex()
    assert bytes.fromhex(anomaly.span_id) in trace.by_id
    assert anomaly.summary and anomaly.evidence


@pytest.mark.parametrize("detector", PER_TRACE, ids=lambda d: d.kind.value)
def test_contract_is_deterministic(detector):
    first = _warm(type(detector)(CONFIG) if detector.kind == AnomalyKind.UNPAIRED_CLIENT_SPAN else detector)
    second = _warm(type(detector)(CONFIG) if detector.kind == AnomalyKind.UNPAIRED_CLIENT_SPAN else detector)
    trace = _fault_traces()[detector.kind]
    assert [a.model_dump() for a in first.detect(trace)] == [a.model_dump() for a in second.detect(trace)]


def test_missing_root_names_the_outermost_orphan_and_absorbs_its_siblings():
    trace = decide(row(1, 3, 1, start_ms=5, end_ms=10), row(1, 2, 1, start_ms=1, end_ms=10), row(1, 4, 9, start_ms=2))
    (root,) = MissingRoot().detect(trace)
    assert root.span_id == sid(2).hex()
    assert root.evidence["missing_root_span_id"] == sid(1).hex()
    assert set(root.evidence["children_of_missing_root"]) == {sid(2).hex(), sid(3).hex()}
    # span 4's parent 9 is a second, separate loss
    (parent,) = MissingParent().detect(trace)
    assert parent.evidence["missing_parent_span_id"] == sid(9).hex()


def test_one_missing_parent_finding_per_lost_span():
    trace = decide(row(1, 1), row(1, 3, 2, start_ms=2), row(1, 4, 2, start_ms=1), row(1, 5, 7))
    found = MissingParent().detect(trace)
    assert [(a.evidence["missing_parent_span_id"], a.evidence["orphan_count"], a.span_id) for a in found] == [
        (sid(2).hex(), 2, sid(4).hex()), (sid(7).hex(), 1, sid(5).hex())]


def test_unfinished_span_end_before_start():
    trace = decide(row(1, 1, start_ms=10, end_ms=4))
    (anomaly,) = UnfinishedSpan().detect(trace)
    assert "before it starts" in anomaly.evidence["problem"]


@pytest.mark.parametrize("child, parent_service, expected", [
    (dict(end_ms=101.5, service="a"), "a", True),       # same service: 1.5 ms > min_overrun
    (dict(end_ms=100.5, service="a"), "a", False),      # within min_overrun
    (dict(end_ms=115, service="b"), "a", False),        # other service: within the skew tolerance
    (dict(end_ms=125, service="b"), "a", True),         # beyond it
    (dict(end_ms=900, service="a", kind=KIND_CONSUMER), "a", False),
    (dict(end_ms=900, service="a", kind=KIND_PRODUCER), "a", False),
    (dict(end_ms=900, service="a", links=True), "a", False),
    (dict(end_ms=None, service="a"), "a", False),       # unfinished is its own finding
])
def test_context_outlived_parent_tolerances_and_exemptions(child, parent_service, expected):
    trace = decide(row(1, 1, end_ms=100, service=parent_service), row(1, 2, 1, start_ms=1, **child))
    found = ContextOutlivedParent(CONFIG).detect(trace)
    assert bool(found) is expected
    if expected:
        assert found[0].span_id == sid(2).hex() and found[0].evidence["overrun_ms"] > 0


def _client_call(n, paired=True, **client):
    rows = [row(n, 1, end_ms=100, kind=KIND_SERVER, service="fe", name="GET /"),
            row(n, 2, 1, start_ms=5, end_ms=50, kind=KIND_CLIENT, service="fe", name="GET /cart", **client)]
    if paired:
        rows.append(row(n, 3, 2, start_ms=6, end_ms=49, kind=KIND_SERVER, service="cart", name="GET /cart"))
    return decide(*rows)


def test_unpaired_needs_history_of_pairing():
    detector = UnpairedClientSpan(StructuralConfig(unpaired_min_samples=3))
    assert detector.detect(_client_call(1, paired=False)) == []   # no history yet
    for n in range(2, 5):
        detector.detect(_client_call(n))
    assert detector.detect(_client_call(9, paired=False)) == []   # 3 of 4 paired: 75% < 90%
    for n in range(10, 50):
        detector.detect(_client_call(n))
    assert len(detector.detect(_client_call(99, paired=False))) == 1


@pytest.mark.parametrize("client, history", [
    (dict(status=STATUS_ERROR), {}),                                   # never reached the server
    # a database or broker may be traced (a proxy); a call without its span is still fine
    (dict(attrs=(("db.system", "postgresql"),)), dict(attrs=(("db.system", "postgresql"),))),
    (dict(attrs=(("messaging.system", "kafka"),)), dict(attrs=(("messaging.system", "kafka"),))),
])
def test_unpaired_exemptions(client, history):
    detector = UnpairedClientSpan(StructuralConfig(unpaired_min_samples=3))
    for n in range(2, 10):
        detector.detect(_client_call(n, **history))
    assert detector.detect(_client_call(99, paired=False, **client)) == []


@pytest.mark.parametrize("response, paired_expected", [
    (("http.response.status_code", 503), True),
    (("rpc.grpc.status_code", 13), True),    # INTERNAL: a server answered
    (("rpc.grpc.status_code", 14), False),   # UNAVAILABLE: no server was reached
    (("rpc.grpc.status_code", 4), False),    # DEADLINE_EXCEEDED: none answered in time
    (("rpc.grpc.status_code", "14"), False),  # as Zipkin and Jaeger carry it: a string
    (("rpc.grpc.status_code", "13"), True),
])
def test_unpaired_error_with_a_response_status_is_still_expected_to_pair(response, paired_expected):
    detector = UnpairedClientSpan(StructuralConfig(unpaired_min_samples=3))
    for n in range(2, 10):
        detector.detect(_client_call(n))
    found = detector.detect(_client_call(99, paired=False, status=STATUS_ERROR, attrs=(response,)))
    assert len(found) == int(paired_expected)


def test_unpaired_state_is_bounded_by_its_window():
    detector = UnpairedClientSpan(StructuralConfig(unpaired_min_samples=3, unpaired_window=10))
    for n in range(200):
        detector.detect(_client_call(n))
    stage = detector.stages_[("fe", "GET /cart")]
    seen, paired = stage.seen, stage.paired
    assert seen <= 10 and paired == seen


def test_late_span_finding():
    anomaly = LateSpan().detect_late(tid(1), to_span(row(1, 2, 1, end_ms=50)), decided_at=10**19, detected_at=10**19 + 5)
    assert (anomaly.kind, anomaly.trace_id, anomaly.span_id) == (AnomalyKind.LATE_SPAN, tid(1).hex(), sid(2).hex())
    assert anomaly.detected_at == 10**19 + 5 and anomaly.evidence["parent_span_id"] == sid(1).hex()


def test_late_span_summary_says_before_or_after_the_decision_in_words():
    span = to_span(row(1, 2, 1, end_ms=50_000))
    after = LateSpan().detect_late(tid(1), span, decided_at=span.end - 42_768 * MS, detected_at=span.end)
    assert "(it ended 42.8 s after the decision)" in after.summary  # was "ended -42768.0 ms before"
    before = LateSpan().detect_late(tid(1), span, decided_at=span.end + 1_500 * MS, detected_at=span.end + 2 * 10**9)
    assert "(it ended 1.5 s before the decision)" in before.summary


@pytest.mark.parametrize("nanos, text", [(850_000, "850 µs"), (27_465_448, "27.5 ms"), (42_768 * MS, "42.8 s"),
                                         (192 * 10**9, "3.2 min"), (5_400 * 10**9, "1.5 h")])
def test_durations_read_as_people_write_them(nanos, text):
    assert duration(nanos) == text


@pytest.mark.parametrize("ratio, text", [(1.3213, "1.32x"), (48.04, "48x"), (27_465_448.729, "over 1000x")])
def test_ratios_read_as_people_write_them(ratio, text):
    assert times(ratio) == text  # a baseline of 0.001 ms made "27465448.729x"


def test_ids_differ_by_kind_trace_and_span_and_repeat_exactly():
    a = ContextOutlivedParent(CONFIG).detect(decide(row(1, 1, end_ms=100), row(1, 2, 1, end_ms=400)))[0]
    b = ContextOutlivedParent(CONFIG).detect(decide(row(2, 1, end_ms=100), row(2, 2, 1, end_ms=400)))[0]
    c = ContextOutlivedParent(CONFIG).detect(decide(row(1, 1, end_ms=100), row(1, 2, 1, end_ms=400)))[0]
    assert a.id != b.id and a.id == c.id and len(a.id) == 32
