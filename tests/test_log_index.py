from builders import sid, tid
from traceguard.config import LogConfig
from traceguard.link import LogIndex, link_logs
from traceguard.metrics import Metrics
from traceguard.records import Anomaly, AnomalyKind, LogRow


def log(trace=1, span=None, time=0, severity=9, body="x"):
    return LogRow(tid(trace), sid(span) if span else None, time, severity, "", body, "svc")


def anomaly(span=2):
    return Anomaly(id="0" * 32, kind=AnomalyKind.MISSING_PARENT, trace_id=tid(1).hex(), span_id=sid(span).hex(),
                   service="svc", operation="op", event_time=0, detected_at=0, severity="warning", score=1.0,
                   summary="s", evidence={})


def test_links_own_span_errors_first_then_own_span_then_trace_errors_then_rest():
    logs = [log(span=3, time=1, body="other info"), log(span=3, time=2, severity=17, body="other error"),
            log(span=2, time=3, body="own info"), log(span=2, time=4, severity=17, body="own error"),
            log(span=None, time=0, body="no span")]
    found = anomaly()
    link_logs(found, logs, limit=4)
    assert [l.body for l in found.logs] == ["own error", "own info", "other error", "no span"]
    assert found.logs[0].span_id == sid(2).hex()


def test_index_is_bounded_per_trace_and_in_total_and_counts_what_it_drops():
    now = [0]
    metrics = Metrics()
    index = LogIndex(LogConfig(max_records=5, max_per_trace=3, ttl=100), lambda: now[0], metrics)
    index.add([log(trace=1, time=i) for i in range(4)])
    assert len(index.get(tid(1))) == 3
    assert metrics.get("traceguard_logs_dropped_total", reason="per_trace_bound") == 1
    assert metrics.get("traceguard_logs_indexed_total") == 3
    index.add([log(trace=2, time=i) for i in range(3)])
    assert index.get(tid(1)) == [] and len(index.get(tid(2))) == 3
    assert metrics.get("traceguard_logs_evicted_total", reason="bound") == 3
    assert index.records == 3


def test_index_expires_by_ttl_of_the_pipeline_clock():
    now = [0]
    metrics = Metrics()
    index = LogIndex(LogConfig(ttl=10), lambda: now[0], metrics)
    index.add([log(trace=1)])
    now[0] = 11 * 10**9
    index.add([log(trace=2)])
    assert index.get(tid(1)) == [] and index.get(tid(2))
    assert metrics.get("traceguard_logs_evicted_total", reason="ttl") == 1


def test_a_record_delivered_again_is_held_once_and_counted():
    """A Kafka partition re-read after a rebalance (or an exporter's retry) delivers
    records the index holds already; a finding must list each once."""
    metrics = Metrics()
    index = LogIndex(LogConfig(), lambda: 0, metrics)
    first = [log(span=2, time=5, body="a"), log(span=2, time=5, body="b"), log(span=3, time=5, body="a")]
    index.add(first)
    index.add([log(span=2, time=5, body="a"), log(span=3, time=5, body="a"), log(span=3, time=6, body="a")])
    assert [(l.span_id, l.time, l.body) for l in index.get(tid(1))] == [
        (sid(2), 5, "a"), (sid(2), 5, "b"), (sid(3), 5, "a"), (sid(3), 6, "a")]
    assert metrics.get("traceguard_logs_dropped_total", reason="duplicate") == 2
    assert index.records == 4 == metrics.get("traceguard_logs_indexed_total")
