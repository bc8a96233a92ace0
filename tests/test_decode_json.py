import base64
import json

import orjson
import pytest
from google.protobuf.json_format import MessageToDict, MessageToJson

from builders import logs_request, sid, tid, traces_request
from traceguard.config import DecodeConfig
from traceguard.decode import DecodeError, decode_json_line, decode_logs_json, decode_traces_json, decode_traces_proto
from traceguard.decode.common import StageAttributes
from traceguard.decode.otlp_json import _walk_traces
from traceguard.decode.otlp_proto import decode_traces_message
from traceguard.decode.zipkin_json import decode_zipkin_spans
from traceguard.records import KIND_CLIENT, KIND_NAMES, KIND_SERVER, SPAN_CORE, STATUS_ERROR

CONFIG = DecodeConfig()
REQUEST = traces_request(
    dict(trace_id=tid(1), span_id=sid(2), parent_span_id=sid(3), name="GET /x", kind=KIND_CLIENT,
         start_time_unix_nano=1_767_225_600_000_000_001, end_time_unix_nano=1_767_225_600_000_000_900,
         status=STATUS_ERROR, links=2, attributes={"db.system": "redis", "other": "x"}),
    dict(trace_id=tid(1), span_id=sid(3), name="root", kind=2, start_time_unix_nano=1, end_time_unix_nano=2),
    service="cart",
)


def _fields(rows):
    return [(r.trace_id, r.core, r.end, r.service, r.name, r.attrs) for r in rows]


def _collector_json(message) -> dict:
    """What the Collector's file exporter writes: hex ids, integer enums."""
    document = MessageToDict(message, use_integers_for_enums=True)
    for rs in document["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return document


def test_collector_json_decodes_like_protobuf():
    expected = _fields(decode_traces_proto(REQUEST.SerializeToString(), CONFIG).rows)
    assert _fields(decode_traces_json(_collector_json(REQUEST), CONFIG).rows) == expected


def test_generic_protobuf_json_with_base64_ids_and_enum_names():
    document = json.loads(MessageToJson(REQUEST))
    assert document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["kind"] == "SPAN_KIND_CLIENT"
    expected = _fields(decode_traces_proto(REQUEST.SerializeToString(), CONFIG).rows)
    assert _fields(decode_traces_json(document, CONFIG).rows) == expected


def _one_span(**span) -> dict:
    base = {"traceId": tid(1).hex(), "spanId": sid(2).hex(), "name": "x",
            "startTimeUnixNano": "10", "endTimeUnixNano": 20}
    base.update(span)
    return {"resourceSpans": [{"scopeSpans": [{"spans": [base]}]}]}


@pytest.mark.parametrize("span, message", [
    ({"traceId": "abc"}, "neither hex nor base64"),
    ({"traceId": "00" * 16}, "traceId must be 16 non-zero"),
    ({"spanId": "0102"}, "spanId must be 8 bytes"),
    ({"parentSpanId": "zz" * 8}, "neither hex nor base64"),
    ({"spanId": 12}, "spanId must be a string"),
    ({"startTimeUnixNano": "soon"}, "not an integer"),
    ({"endTimeUnixNano": -5}, "out of range"),
    ({"kind": "SPAN_KIND_SIDEWAYS"}, "kind"),
    ({"kind": 9}, "kind"),
    ({"name": 5}, "name must be a string"),
])
def test_bad_span_fields_are_rejected(span, message):
    decoded = decode_traces_json(_one_span(**span), CONFIG)
    assert decoded.rejected == 1 and not decoded.rows
    assert message in decoded.errors[0]


def test_an_int_attribute_that_is_not_an_integer_has_no_value_instead_of_failing_the_decoder():
    document = _one_span(kind=KIND_CLIENT, attributes=[{"key": "http.status_code", "value": {"intValue": "abc"}},
                                                      {"key": "db.system", "value": {"stringValue": "redis"}}])
    (row,) = decode_traces_json(document, CONFIG).rows
    assert row.attrs == (("db.system", "redis"),)  # a call's status code is not kept for the stage
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["status"] = {"code": STATUS_ERROR}
    (row,) = decode_traces_json(document, CONFIG).rows
    assert row.attrs == (("db.system", "redis"), ("http.status_code", None))


def test_missing_service_name_is_unknown_service():
    (row,) = decode_traces_json(_one_span(), CONFIG).rows
    assert row.service == "unknown_service" and row.end == 20


@pytest.mark.parametrize("line, message", [
    (b"{not json", "invalid JSON"),
    (b'{"something": 1}', "not an OTLP JSON object"),
    (b"[1, 2]", "not an OTLP JSON object"),
])
def test_lines_that_are_not_otlp_json(line, message):
    with pytest.raises(DecodeError, match=message):
        decode_json_line(line)


@pytest.mark.parametrize("document", [
    {"resourceSpans": "nope"},
    {"resourceSpans": [{"scopeSpans": 5}]},
    {"resourceSpans": [7]},
])
def test_wrongly_shaped_documents_are_decode_errors(document):
    with pytest.raises(DecodeError):
        decode_traces_json(document, CONFIG)


def test_span_that_is_not_an_object_is_rejected_alone():
    document = _one_span()
    document["resourceSpans"][0]["scopeSpans"][0]["spans"].append("garbage")
    decoded = decode_traces_json(document, CONFIG)
    assert decoded.rejected == 1 and len(decoded.rows) == 1


def test_logs_json():
    request = logs_request(
        dict(trace_id=tid(1), span_id=sid(2), time_unix_nano=5, severity_number=17, severity_text="ERROR", body="boom"),
        dict(body="no trace id"),
    )
    document = MessageToDict(request)
    signal, parsed = decode_json_line(orjson.dumps(document))
    assert signal == "logs"
    (log,) = decode_logs_json(parsed, CONFIG).rows
    assert (log.trace_id, log.span_id, log.time, log.severity_number, log.body) == (tid(1), sid(2), 5, 17, "boom")


_ERROR, _UNSET, _OK = STATUS_ERROR, 0, 1


@pytest.mark.parametrize("kind, attributes, status, expected", [
    (KIND_SERVER, {"http.response.status_code": 500}, None, _ERROR),
    (KIND_SERVER, {"http.response.status_code": 404}, None, _UNSET),  # the caller's mistake
    (KIND_CLIENT, {"http.response.status_code": 404}, None, _ERROR),
    (KIND_CLIENT, {"http.status_code": "503"}, None, _ERROR),  # older key, carried as a string
    (KIND_CLIENT, {"http.status_code": "5O3"}, None, _UNSET),  # not a number
    (KIND_CLIENT, {"rpc.grpc.status_code": 14}, None, _ERROR),
    (KIND_CLIENT, {"rpc.grpc.status_code": 0}, None, _UNSET),
    (KIND_SERVER, {"rpc.grpc.status_code": 14}, None, _ERROR),  # UNAVAILABLE
    (KIND_SERVER, {"rpc.grpc.status_code": 5}, None, _UNSET),  # NOT_FOUND: the caller's mistake
    (KIND_SERVER, {"http.response.status_code": 503}, 1, 1),  # an explicit OK is the instrumentation's judgement
    (KIND_SERVER, {"other": 500}, None, _UNSET),
])
def test_an_unset_status_is_read_from_the_response_code_by_every_decoder(kind, attributes, status, expected):
    """The semantic conventions' span status: many instrumentations, and every
    Jaeger or Zipkin span, record only the response code."""
    request = traces_request(dict(trace_id=tid(1), span_id=sid(2), name="op", kind=kind, status=status,
                                  start_time_unix_nano=10, end_time_unix_nano=20, attributes=attributes))
    document = _collector_json(request)

    def status_of(decoded):
        assert len(decoded.rows) == 1
        return SPAN_CORE.unpack(decoded.rows[0].core)[4]

    assert status_of(decode_traces_proto(request.SerializeToString(), CONFIG)) == expected  # C
    assert status_of(decode_traces_message(request, CONFIG)) == expected  # the reference over upb
    assert status_of(decode_traces_json(document, CONFIG)) == expected  # C
    assert status_of(_walk_traces(document, CONFIG, StageAttributes())) == expected  # the reference
    zipkin = {"traceId": tid(1).hex(), "id": sid(2).hex(), "name": "op", "timestamp": 1, "duration": 1,
              "kind": KIND_NAMES[kind].upper(), "localEndpoint": {"serviceName": "svc"},
              "tags": {key: str(value) for key, value in attributes.items()}
              | ({"otel.status_code": "OK"} if status == 1 else {})}
    spans, _ = decode_zipkin_spans([zipkin], CONFIG)
    assert status_of(spans) == expected  # tags are strings
