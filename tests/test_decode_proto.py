import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from builders import logs_request, sid, tid, traces_request
from traceguard.config import DecodeConfig
from traceguard.decode import DecodeError, decode_logs_proto, decode_traces_proto
from traceguard.decode.common import StageAttributes
from traceguard.decode.otlp_proto import decode_traces_message
from traceguard.records import FLAG_HAS_LINKS, KIND_CLIENT, KIND_SERVER, NO_PARENT, SPAN_CORE, STATUS_ERROR

CONFIG = DecodeConfig()


def test_span_fields_survive_decoding():
    request = traces_request(
        dict(trace_id=tid(1), span_id=sid(2), parent_span_id=sid(3), name="GET /x", kind=KIND_CLIENT,
             start_time_unix_nano=100, end_time_unix_nano=250, status=STATUS_ERROR, links=1,
             attributes={"db.system": "postgresql", "http.request.header.x": "dropped", "http.response.status_code": 503}),
        service="checkout",
    )
    decoded = decode_traces_proto(request.SerializeToString(), CONFIG)
    assert decoded.rejected == 0
    (row,) = decoded.rows
    assert row.trace_id == tid(1) and row.end == 250
    assert row.service == "checkout" and row.name == "GET /x"
    assert SPAN_CORE.unpack(row.core) == (sid(2), sid(3), 100, KIND_CLIENT, STATUS_ERROR, FLAG_HAS_LINKS)
    assert dict(row.attrs) == {"db.system": "postgresql", "http.response.status_code": 503}


def test_root_and_server_spans_keep_no_attributes():
    request = traces_request(dict(trace_id=tid(1), span_id=sid(2), kind=KIND_SERVER, attributes={"http.route": "/x"}))
    (row,) = decode_traces_proto(request.SerializeToString(), CONFIG).rows
    assert row.core[8:16] == NO_PARENT
    assert row.attrs is None


def test_traces_data_has_the_same_layout():
    data = TracesData()
    data.resource_spans.extend(traces_request(dict(trace_id=tid(1), span_id=sid(2))).resource_spans)
    assert len(decode_traces_proto(data.SerializeToString(), CONFIG).rows) == 1


@pytest.mark.parametrize("fields, message", [
    (dict(trace_id=b"\x01" * 15, span_id=sid(2)), "trace_id must be 16"),
    (dict(trace_id=bytes(16), span_id=sid(2)), "trace_id must be 16 non-zero"),
    (dict(trace_id=tid(1), span_id=b"\x01" * 9), "span_id must be 8"),
    (dict(trace_id=tid(1), span_id=bytes(8)), "span_id must be 8 non-zero"),
    (dict(trace_id=tid(1), span_id=sid(2), parent_span_id=b"\x01" * 4), "parent_span_id must be empty or 8"),
])
def test_invalid_ids_are_rejected_and_the_rest_kept(fields, message):
    request = traces_request(fields, dict(trace_id=tid(1), span_id=sid(5)))
    decoded = decode_traces_proto(request.SerializeToString(), CONFIG)
    assert decoded.rejected == 1
    assert message in decoded.errors[0]
    assert [r.core[:8] for r in decoded.rows] == [sid(5)]


def test_truncated_protobuf_is_a_decode_error():
    data = traces_request(dict(trace_id=tid(1), span_id=sid(2), name="x" * 50)).SerializeToString()
    with pytest.raises(DecodeError, match="not an OTLP traces protobuf"):
        decode_traces_proto(data[:-7], CONFIG)


def test_huge_names_and_attributes_are_clipped():
    request = traces_request(dict(trace_id=tid(1), span_id=sid(2), kind=KIND_CLIENT, name="n" * 100_000,
                                  attributes={"server.address": "a" * 1_000_000}))
    (row,) = decode_traces_proto(request.SerializeToString(), DecodeConfig(max_name_length=64, max_attribute_length=32)).rows
    assert len(row.name) == 64
    assert row.attrs == (("server.address", "a" * 32),)


def test_unknown_kind_and_status_values_mean_unspecified():
    request = traces_request(dict(trace_id=tid(1), span_id=sid(2), kind=77, status=9))
    (row,) = decode_traces_proto(request.SerializeToString(), CONFIG).rows
    assert SPAN_CORE.unpack(row.core)[3:5] == (0, 0)


def test_many_rejects_keep_a_bounded_number_of_messages():
    bad = [dict(trace_id=b"\x01", span_id=sid(i + 1)) for i in range(100)]
    decoded = decode_traces_proto(traces_request(*bad).SerializeToString(), CONFIG)
    assert decoded.rejected == 100 and len(decoded.errors) == 5


def test_logs_decode_and_skip_records_without_trace():
    request = logs_request(
        dict(trace_id=tid(1), span_id=sid(2), time_unix_nano=5, severity_number=17, severity_text="ERROR", body="boom"),
        dict(time_unix_nano=6, body="no trace"),
        dict(trace_id=b"\x01" * 3, body="bad id"),
        service="payment",
    )
    decoded = decode_logs_proto(request.SerializeToString(), CONFIG)
    assert decoded.rejected == 1 and "trace_id must be 16" in decoded.errors[0]
    (log,) = decoded.rows
    assert (log.trace_id, log.span_id, log.time, log.severity_number, log.body, log.service) == (
        tid(1), sid(2), 5, 17, "boom", "payment")


def test_garbage_logs_body_is_a_decode_error():
    with pytest.raises(DecodeError):
        decode_logs_proto(b"\xff\xff\xff", CONFIG)


def test_kept_attributes_are_read_once_per_stage_but_per_call_on_errors():
    stages = StageAttributes()
    first = traces_request(dict(trace_id=tid(1), span_id=sid(2), kind=KIND_CLIENT, name="GET",
                                attributes={"server.address": "a", "http.response.status_code": 200}))
    later = traces_request(
        dict(trace_id=tid(1), span_id=sid(3), kind=KIND_CLIENT, name="GET", attributes={"server.address": "b"}),
        dict(trace_id=tid(1), span_id=sid(4), kind=KIND_CLIENT, name="GET", status=STATUS_ERROR,
             attributes={"server.address": "c", "http.response.status_code": 503}),
    )
    (a,) = decode_traces_proto(first.SerializeToString(), CONFIG, stages).rows
    b, c = decode_traces_proto(later.SerializeToString(), CONFIG, stages).rows
    assert a.attrs == (("server.address", "a"),)  # a response status is a fact of one call, not the stage
    assert b.attrs is a.attrs
    assert c.attrs == (("http.response.status_code", 503), ("server.address", "c"))


def test_a_kept_key_sent_twice_is_kept_once_with_its_first_value():
    """Keys are unique in OTLP: a repeated one is kept once (a span repeating one 190k
    times held 190k pairs); two types under one key no longer meet in a sort (which
    used to raise TypeError out of the decoder)."""
    request = traces_request(dict(trace_id=tid(1), span_id=sid(2), kind=KIND_CLIENT, status=STATUS_ERROR,
                                  attributes={"http.status_code": 503, "db.system": "redis"}))
    request.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="http.status_code").value.string_value = "x"
    for decode in (decode_traces_proto, lambda data, config: decode_traces_message(
            ExportTraceServiceRequest.FromString(data), config)):
        (row,) = decode(request.SerializeToString(), CONFIG).rows
        assert row.attrs == (("db.system", "redis"), ("http.status_code", 503))


def test_a_kept_key_repeated_a_hundred_thousand_times_costs_one_pair():
    request = traces_request(dict(trace_id=tid(1), span_id=sid(2), kind=KIND_CLIENT, status=STATUS_ERROR))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    for n in range(100_000):
        span.attributes.add(key="db.system").value.string_value = f"redis{n}"
    for decode in (decode_traces_proto, lambda data, config: decode_traces_message(
            ExportTraceServiceRequest.FromString(data), config)):
        (row,) = decode(request.SerializeToString(), CONFIG).rows
        assert row.attrs == (("db.system", "redis0"),)


def test_stage_memory_is_bounded():
    stages = StageAttributes(limit=2)
    spans = [dict(trace_id=tid(1), span_id=sid(n + 1), kind=KIND_CLIENT, name=f"op{n}",
                  attributes={"server.address": f"h{n}"}) for n in range(5)]
    rows = decode_traces_proto(traces_request(*spans).SerializeToString(), CONFIG, stages).rows
    assert [dict(r.attrs)["server.address"] for r in rows] == [f"h{n}" for n in range(5)]
    assert 0 < len(stages._stages) <= 2  # at the bound the cache starts again: nothing held for ever
