"""The span-row code in C (_rows.c) against its Python reference.

Decode (vs decode_traces_message and decode_logs_message over upb): the same
rows, rejections and messages on the scenario's traffic, on hand-made edge
cases of protobuf's merge rules, on thousands of randomly mutated messages that
upb still accepts and on messages generated from the schema.
Expand (vs assembler._expand_rows): the same spans and indexes."""

from __future__ import annotations

import random
import struct
import sys

import orjson
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from traceguard.config import DecodeConfig
from traceguard.decode.common import (
    KEPT_ATTRIBUTES,
    MAX_ERROR_MESSAGES,
    UNKNOWN_SERVICE,
    Decoded,
    DecodeError,
    StageAttributes,
)
from traceguard.decode.otlp_json import _event_logs, _walk_traces
from traceguard.assemble.assembler import _expand_rows
from traceguard.decode.otlp_proto import _decode_native, decode_logs_message, decode_logs_proto, decode_traces_message
from traceguard.detect.context_outlived_parent import _ended_after_parent
from traceguard.models.forest import stage_totals
from traceguard.models.features import span_latency_keys, span_latency_samples, span_self_times, span_shape
from traceguard.native import rows as native
from traceguard.native import wire_schema
from traceguard.records import KIND_PRODUCER
from benchmarks.scenario import otlp_json
from builders import row

CONFIG = DecodeConfig(max_name_length=16, max_log_body_length=24)


def test_the_extension_is_built():
    """CI must test the C path, not silently the fallback."""
    assert native is not None


def both(data: bytes, fast_stages: StageAttributes | None = None, reference_stages: StageAttributes | None = None):
    fast = _decode_native(data, CONFIG, fast_stages or StageAttributes())
    reference = decode_traces_message(ExportTraceServiceRequest.FromString(data), CONFIG,
                                      reference_stages or StageAttributes())
    return fast, reference


def same(fast, reference) -> None:
    def rows(decoded):
        return [(r.trace_id, r.core, r.end, r.service, r.name, r.attrs, r.instance) for r in decoded.rows]

    def events(decoded):
        return [(e.trace_id, e.span_id, e.time, e.severity_number, e.severity_text, e.body, e.service)
                for e in decoded.events]

    assert rows(fast) == rows(reference)
    assert (fast.rejected, fast.errors) == (reference.rejected, reference.errors)
    assert events(fast) == events(reference)


def read_messages(path):
    with open(path, "rb") as stream:
        while prefix := stream.read(4):
            yield stream.read(struct.unpack(">I", prefix)[0])


def test_the_scenario_decodes_the_same(scenario_proto):
    fast_stages, reference_stages = StageAttributes(), StageAttributes()
    count = 0
    for data in read_messages(scenario_proto / "traces.pb"):
        fast, reference = both(data, fast_stages, reference_stages)
        same(fast, reference)
        count += len(fast.rows)
    assert count > 10_000
    assert fast_stages.known == reference_stages.known


def kv(key: str, **value) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def request_of(*items: Span | LogRecord, resource_attributes=(kv("service.name", string_value="cart"),)) -> bytes:
    """A traces request of the spans, or a logs request of the log records, all under one resource."""
    logs = bool(items) and isinstance(items[0], LogRecord)
    message = ExportLogsServiceRequest() if logs else ExportTraceServiceRequest()
    resource = (message.resource_logs if logs else message.resource_spans).add()
    resource.resource.attributes.extend(resource_attributes)
    scope = (resource.scope_logs if logs else resource.scope_spans).add()
    (scope.log_records if logs else scope.spans).extend(items)
    return message.SerializeToString()


def good_span(**fields) -> Span:
    base = dict(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), name="GET /cart", kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=1_000, end_time_unix_nano=2_000,
                attributes=[kv("db.system", string_value="redis"), kv("other", int_value=3)])
    base.update(fields)
    return Span(**base)


def field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field, by hand: what the generated classes will not write (duplicates, wrong wire types)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


@pytest.mark.parametrize("data", [
    request_of(good_span(trace_id=b"\x01" * 8), good_span(span_id=bytes(8)), good_span(parent_span_id=b"\x02" * 3),
               good_span(trace_id=bytes(16), span_id=b""), good_span()),
    request_of(good_span(name="ÜberlangerNameMitUmlauten-und-mehr"), good_span(kind=-3), good_span(kind=9),
               good_span(status=Status(code=Status.STATUS_CODE_ERROR), attributes=[kv("http.status_code", int_value=503)]),
               good_span(links=[Span.Link()]), good_span(kind=Span.SPAN_KIND_SERVER)),
    request_of(good_span(), resource_attributes=()),
    request_of(good_span(), resource_attributes=(kv("service.name", int_value=4), kv("service.name", string_value="x"))),
    request_of(good_span(), resource_attributes=(kv("service.name", string_value=""),)),
    # kept attribute values of every scalar type, clipped strings, a key twice, a value-less one, an error span
    request_of(*(good_span(span_id=bytes([n]) * 8, name=f"call {n}", status=Status(code=n % 3), attributes=[
        kv("peer.service", string_value="a-rather-long-peer-name"), kv("http.status_code", int_value=-n),
        kv("rpc.method", bool_value=True), kv("server.address", double_value=n / 3), kv("db.system", bytes_value=b"\0"),
        kv("rpc.system", string_value_strindex=n), KeyValue(key="http.route"), kv("peer.service", string_value="b"),
        kv("not.kept", int_value=1)]) for n in range(1, 4))),
    # another member of AnyValue's oneof set after string_value replaces it (string_value_strindex,
    # field 8, in newer opentelemetry-proto; an unknown field in older ones, ignored)
    request_of(good_span())[:0] + field(1, 2, field(1, 2, field(1, 2, field(1, 2, b"service.name") + field(
        2, 2, field(1, 2, b"cart") + field(8, 0, b"\x03")))) + field(2, 2, field(2, 2, good_span().SerializeToString()))),
    # duplicate scalars (last wins), two status messages (merged), a known field with the wrong wire type (unknown)
    request_of(good_span()) [:0] + field(1, 2, field(1, 2, field(1, 2, kv("service.name", string_value="a").SerializeToString()))
        + field(2, 2, field(2, 2, good_span().SerializeToString() + field(5, 2, b"renamed") + field(6, 0, b"\x02")
                            + field(15, 2, field(3, 0, b"\x02")) + field(15, 2, field(2, 2, b"msg"))
                            + field(7, 0, b"\x05") + field(13, 0, b"\x01")))),
    # a resource that comes after its spans, and a second resource occurrence (attributes append)
    field(1, 2, field(2, 2, field(2, 2, good_span().SerializeToString()))
          + field(1, 2, field(1, 2, kv("host", string_value="h").SerializeToString()))
          + field(1, 2, field(1, 2, kv("service.name", string_value="late").SerializeToString()))),
], ids=["rejections", "names-kinds-status-links", "no-resource", "non-string-service", "empty-service", "attribute-values", "oneof",
        "merge-rules", "resource-after-spans"])
def test_edge_cases_decode_the_same(data):
    same(*both(data))


@pytest.mark.parametrize("attributes, pod", [
    ((kv("service.instance.id", string_value="cart-7f9c"), kv("k8s.pod.name", string_value="cart-5d8b-x2")),
     "cart-5d8b-x2"),
    ((kv("k8s.pod.name", string_value=""), kv("service.instance.id", string_value="i-1"),
      kv("service.instance.id", string_value="i-2")), "i-1"),
    ((kv("service.instance.id", int_value=3),), None),
    ((), None),
])
def test_the_pod_is_k8s_pod_name_else_service_instance_id_in_both_encodings(attributes, pod):
    data = request_of(good_span(), resource_attributes=(kv("service.name", string_value="cart"), *attributes))
    fast, reference = both(data)
    same(fast, reference)
    assert [r.instance for r in fast.rows] == [pod]
    document = orjson.loads(otlp_json(ExportTraceServiceRequest.FromString(data)))
    fast_json, reference_json = json_c_walk(document), json_reference(document)
    same(fast_json, reference_json)
    assert [r.instance for r in fast_json.rows] == [pod]
    (span,) = native.expand(fast.rows)[0]
    assert span.instance == pod


def test_a_cached_stage_is_shared_and_an_error_span_is_read_alone():
    stages_fast, stages_reference = StageAttributes(), StageAttributes()
    for data in (request_of(good_span()), request_of(good_span(attributes=[kv("db.system", string_value="mysql")]))):
        fast, reference = both(data, stages_fast, stages_reference)
        same(fast, reference)
    assert fast.rows[0].attrs == (("db.system", "redis"),)  # the stage's first span decides


def good_log(**fields) -> LogRecord:
    base = dict(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), time_unix_nano=5_000, severity_number=9,
                severity_text="INFO", body=AnyValue(string_value="hello"))
    base.update(fields)
    return LogRecord(**base)


BODIES = [AnyValue(), AnyValue(string_value=""), AnyValue(string_value="ÜberlangeNachricht über mehr als 24 Zeichen"),
          AnyValue(bool_value=True), AnyValue(bool_value=False), AnyValue(int_value=0), AnyValue(int_value=-12),
          AnyValue(int_value=10 ** 30 // 10 ** 12), AnyValue(double_value=0.0), AnyValue(double_value=-0.0),
          AnyValue(double_value=float("nan")), AnyValue(double_value=1e300), AnyValue(bytes_value=b""),
          AnyValue(bytes_value=b"\x00'\xff" * 10), AnyValue(string_value_strindex=4)]


@pytest.mark.parametrize("data", [
    request_of(good_log(trace_id=b"\x01" * 8), good_log(span_id=b"\x02" * 3), good_log(trace_id=b""),
                good_log(trace_id=bytes(16)), good_log(span_id=b""), good_log()),
    request_of(*(good_log(body=body) for body in BODIES)),
    request_of(good_log(time_unix_nano=0, observed_time_unix_nano=77), good_log(observed_time_unix_nano=78),
                good_log(time_unix_nano=0), good_log(severity_number=-3, severity_text="Überwachung"),
                good_log(severity_number=99)),
    request_of(good_log(), resource_attributes=()),
    request_of(good_log(), resource_attributes=(kv("service.name", int_value=4), kv("service.name", string_value="x"))),
    request_of(good_log(), resource_attributes=(kv("service.name", string_value="a-service-name-past-the-limit"),)),
    # the body twice (merged: the member set last wins), ids twice (last wins), an id with the wrong wire type
    field(1, 2, field(2, 2, field(2, 2, good_log().SerializeToString() + field(5, 2, field(3, 0, b"\x07"))
                                  + field(9, 2, bytes(range(2, 18))) + field(10, 0, b"\x01")))
          + field(1, 2, field(1, 2, kv("service.name", string_value="late").SerializeToString()))),
], ids=["rejections", "bodies", "times-severities", "no-resource", "non-string-service", "long-service", "merge-rules"])
def test_log_edge_cases_decode_the_same(data):
    fast = log_walk(data)
    assert fast is not None
    same_logs(fast, logs_reference(data))


def test_a_log_body_the_walk_does_not_read_is_decoded_by_the_reference():
    data = request_of(good_log(), good_log(body=AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1)]))))
    assert log_walk(data) is None
    decoded = decode_logs_proto(data, CONFIG)
    same_logs(decoded, logs_reference(data))
    assert decoded.rows[1].body.startswith("values {")


def test_the_scenario_logs_decode_the_same_and_entirely_in_c(scenario_proto):
    count = 0
    for data in read_messages(scenario_proto / "logs.pb"):
        fast = log_walk(data)
        assert fast is not None
        same_logs(fast, logs_reference(data))
        count += len(fast.rows)
    assert count > 1_000


def c_walk(data: bytes):
    """The C walk's own verdict: its rows, or None where it leaves the bytes to upb."""
    try:
        return _decode_native(data, CONFIG, StageAttributes())
    except native.Unsupported:
        return None


def upb(data: bytes):
    try:
        return ExportTraceServiceRequest.FromString(data)
    except ProtobufDecodeError:
        return None


def traces_reference(data: bytes):
    """The reference decoder over upb's parse; None where upb rejects the bytes."""
    request = upb(data)
    return None if request is None else decode_traces_message(request, CONFIG, StageAttributes())


def log_walk(data: bytes):
    """decode_logs' own verdict, as c_walk's."""
    try:
        rows, rejected, errors = native.decode_logs(data, CONFIG.max_name_length, CONFIG.max_log_body_length,
                                                    MAX_ERROR_MESSAGES, UNKNOWN_SERVICE)
    except native.Unsupported:
        return None
    return Decoded(rows, rejected, errors)


def logs_reference(data: bytes):
    try:
        request = ExportLogsServiceRequest.FromString(data)
    except ProtobufDecodeError:
        return None
    return decode_logs_message(request, CONFIG)


def same_logs(fast, reference) -> None:
    def rows(decoded):
        return [(r.trace_id, r.span_id, r.time, r.severity_number, r.severity_text, r.body, r.service)
                for r in decoded.rows]

    assert rows(fast) == rows(reference)
    assert [type(r.body) for r in fast.rows] == [str] * len(fast.rows)
    assert (fast.rejected, fast.errors) == (reference.rejected, reference.errors)


# Each signal's C walk, its reference (None: upb rejects), and how their results are compared.
SIGNALS = {"traces": (c_walk, traces_reference, same), "logs": (log_walk, logs_reference, same_logs)}


def compare(data: bytes, counts: dict[str, int], signal: str = "traces") -> str:
    """What the C walk accepts, upb accepts too, and both decode it alike; returns which of the three it was."""
    walk, reference, check = SIGNALS[signal]
    fast, expected = walk(data), reference(data)
    if expected is None:
        assert fast is None, f"the C walk accepted bytes upb rejects: {data.hex()}"
        verdict = "rejected"
    elif fast is None:
        verdict = "left_to_upb"
    else:
        check(fast, expected)
        verdict = "compared"
    counts[verdict] += 1
    return verdict


def structured_body(data: bytes) -> bool:
    """Whether a log record with a trace id has an array or key-value list body (the log walk leaves those to upb)."""
    request = ExportLogsServiceRequest.FromString(data)
    return any(record.trace_id and record.body.WhichOneof("value") in ("array_value", "kvlist_value")
               for resource in request.resource_logs for scope in resource.scope_logs for record in scope.log_records)


@pytest.mark.parametrize("signal", ["traces", "logs"])
def test_mutated_messages_are_judged_and_decoded_as_upb_does(scenario_proto, signal):
    rng = random.Random(11)
    messages = [data for data, _ in zip(read_messages(scenario_proto / f"{signal}.pb"), range(3))]
    small = request_of(good_span(), good_span(span_id=b"\x09" * 8, kind=Span.SPAN_KIND_PRODUCER,
                                              links=[Span.Link()], status=Status(code=2))) if signal == "traces" else \
        request_of(good_log(), good_log(span_id=b"", body=AnyValue(int_value=7), time_unix_nano=0))
    counts = dict.fromkeys(("rejected", "left_to_upb", "compared"), 0)
    for attempt in range(10_000):
        data = bytearray(small if attempt % 3 else rng.choice(messages))
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            if rng.random() < 0.8:
                data[position] = rng.randrange(256)
            else:
                del data[position:position + rng.randint(1, 8)]
        compare(bytes(data), counts, signal)
    # byte flips make unknown groups upb can parse and the walk leaves to it; few
    assert counts["compared"] > 1_500 and counts["left_to_upb"] < counts["compared"] / 20, counts


SCHEMA, SCHEMA_INDEX = wire_schema(ExportTraceServiceRequest.DESCRIPTOR, ExportLogsServiceRequest.DESCRIPTOR)
WIRE_OF_TYPE = {FieldDescriptor.TYPE_DOUBLE: 1, FieldDescriptor.TYPE_FLOAT: 5, FieldDescriptor.TYPE_FIXED64: 1,
                FieldDescriptor.TYPE_FIXED32: 5, FieldDescriptor.TYPE_SFIXED32: 5, FieldDescriptor.TYPE_SFIXED64: 1,
                FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_BYTES: 2, FieldDescriptor.TYPE_MESSAGE: 2}
WORDS = ["service.name", "db.system", "http.route", "peer.service", "messaging.system", "http.status_code",
         "GET /cart", "", "Überweisung €", "😀", "x" * 40]
BAD_UTF8 = [b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]
# Id fields (number: length) of the messages that have them: Span, LogRecord.
IDS = {SCHEMA_INDEX["opentelemetry.proto.trace.v1.Span"]: {1: 16, 2: 8, 4: 8},
       SCHEMA_INDEX["opentelemetry.proto.logs.v1.LogRecord"]: {9: 16, 10: 8}}


def random_varint(rng: random.Random) -> bytes:
    """1 to 10 bytes, any value: ints past 32 bits, negative enums as int64."""
    size = rng.randint(1, 10)
    body = bytes(b | 0x80 for b in rng.randbytes(size - 1))
    return body + bytes([rng.randrange(2 if size == 10 else 128)])


def generated_message(rng: random.Random, message: int, depth: int, bad: bool) -> bytes:
    """A random message of this schema type: known fields in their own or (rarely)
    another wire type, unknown fields, repeats of singular fields, ids mostly of
    the right length, strings from a small vocabulary; with ``bad``, a few broken
    UTF-8 strings."""
    fields = SCHEMA[message]
    ids = IDS.get(message, {})
    # ids first, so most spans and log records are not rejected for them
    out = b"".join(field(n, 2, rng.randbytes(size)) for n, size in ids.items() if rng.random() < 0.9)
    for _ in range(rng.randint(0, 7 if depth < 5 else 2)):
        if rng.random() < 0.08:
            number, type_, child = rng.choice([17, 40, 1000]), FieldDescriptor.TYPE_BYTES, -1
        else:
            number, type_, child, _, _ = rng.choice(fields)
        wire = WIRE_OF_TYPE.get(type_, 0) if rng.random() > 0.06 else rng.choice([0, 1, 2, 5])
        if wire == 0 and type_ == FieldDescriptor.TYPE_ENUM and rng.random() < 0.8:
            payload = bytes([rng.randrange(6)])  # span kinds and status codes that mean something
        elif wire == 0:
            payload = random_varint(rng)
        elif wire in (1, 5):
            payload = rng.randbytes(8 if wire == 1 else 4)
        elif type_ == FieldDescriptor.TYPE_MESSAGE:
            payload = generated_message(rng, child, depth + 1, bad) if depth < 8 else b""
        elif type_ == FieldDescriptor.TYPE_STRING:
            payload = rng.choice(BAD_UTF8) if bad and rng.random() < 0.05 else rng.choice(WORDS).encode()
        elif number in ids:
            payload = rng.randbytes(rng.choice([ids[number]] * 6 + [0, 3, 9]))
        else:
            payload = rng.randbytes(rng.randint(0, 12))
        out += field(number, wire, payload)
    return out


@pytest.mark.parametrize("signal, root", [("traces", 0), ("logs", SCHEMA_INDEX[ExportLogsServiceRequest.DESCRIPTOR.full_name])])
def test_messages_generated_from_the_schema_are_judged_and_decoded_as_upb_does(signal, root):
    """Structure-aware: every message type, merge rules and oneofs at any depth,
    broken UTF-8 in any string field, and truncations."""
    rng = random.Random(5)
    counts = dict.fromkeys(("rejected", "left_to_upb", "compared", "structured"), 0)
    for attempt in range(4_000):
        bad = attempt % 4 == 0
        data = generated_message(rng, root, 0, bad)
        if bad and data and rng.random() < 0.5:
            data = data[:rng.randrange(len(data))]
        if compare(data, counts, signal) == "left_to_upb" and signal == "logs":
            assert structured_body(data), data.hex()
            counts["structured"] += 1
    # left to upb: only kept attributes (traces) or bodies (logs) whose value is an array or a key-value list
    assert counts["left_to_upb"] - counts["structured"] < counts["compared"] / 20, counts
    assert counts["compared"] > 2_500 and counts["rejected"] > 200, counts


STAGE_INDEX = {("elsewhere", f"op {i}", 1): i for i in range(5)}


def spans_view(spans) -> list[tuple]:
    return [(s.span_id, s.parent_span_id, s.start, s.end, s.kind, s.status, s.has_links, s.service, s.name, s.attrs,
             s.finished, s.instance) for s in spans]


def expanded_view(result) -> tuple:
    spans, by_id, children, orphans, duplicates, root, stages, failed = result
    assert all(by_id[s.span_id] is s for s in spans)
    assert stages == [(s.service, s.name, s.kind) for s in spans]
    assert failed == [s for s in spans if s.status == 2]
    self_times = native.self_times(spans, children)
    assert self_times == span_self_times(spans, children)
    assert native.latency_keys(spans, children, stages) == span_latency_keys(spans, children, stages)
    assert native.latency_samples(spans, children, self_times) == span_latency_samples(spans, children, self_times)
    assert native.shape(root, spans, children) == span_shape(root, spans, children)
    keys, samples = span_latency_keys(spans, children, stages), span_latency_samples(spans, children, self_times)
    index, reference_index = dict(STAGE_INDEX), dict(STAGE_INDEX)  # a few columns left: the bound is met
    assert native.stage_totals(keys, samples, index, 8) == stage_totals(keys, samples, reference_index, 8)
    assert index == reference_index
    return (spans_view(spans), sorted(by_id), {p: spans_view(g) for p, g in children.items()}, spans_view(orphans),
            duplicates, spans_view([root]) if root is not None else None, self_times,
            native.latency_keys(spans, children, stages), native.shape(root, spans, children))


def test_expand_matches_the_reference_on_the_scenario(scenario_proto):
    rows = [r for data in read_messages(scenario_proto / "traces.pb")
            for r in decode_traces_message(ExportTraceServiceRequest.FromString(data), CONFIG).rows]
    by_trace: dict[bytes, list] = {}
    for r in rows:
        by_trace.setdefault(r.trace_id, []).append(r)
    for trace_rows in by_trace.values():
        assert expanded_view(native.expand(trace_rows)) == expanded_view(_expand_rows(trace_rows))


def test_gather_matches_the_reference_intake(scenario_proto, monkeypatch):
    """The assembler's intake in C (native.gather) and in Python (_take per row) decide
    the same traces at the same times with the same stamps, late spans included
    (the traffic again after it was decided) and unfinished spans first on a fresh clock."""
    import traceguard.assemble.assembler as assembler_module
    from traceguard.assemble import EventTimeClock, TraceAssembler
    from traceguard.config import AssemblerConfig
    from traceguard.metrics import Metrics

    batches = [decode_traces_message(ExportTraceServiceRequest.FromString(data), CONFIG).rows
               for data in read_messages(scenario_proto / "traces.pb")]
    unfinished = row(999_999, 1, None, start_ms=1, end_ms=None)
    batches = [[unfinished]] + batches + batches[:3]  # the first three again: late by then

    def run(with_native: bool):
        monkeypatch.setattr(assembler_module, "native", native if with_native else None)
        decided, late = [], []
        assembler = TraceAssembler(AssemblerConfig(), EventTimeClock(0), decided.append,
                                   lambda trace_id, span, at: late.append((trace_id, span.span_id, at)), Metrics())
        for batch in batches:
            assembler.add([SpanRowCopy(r) for r in batch])
            assembler.advance()
        assembler.flush()
        return [(t.trace_id, t.reason, t.first_seen, t.decided_at, [s.span_id for s in t.spans]) for t in decided], late

    fast, reference = run(True), run(False)
    assert fast == reference and len(fast[1]) > 0 and fast[0][0][0] == unfinished.trace_id


def SpanRowCopy(r):
    """A fresh row: the intake rewrites trace ids in place (one id object per trace)."""
    return type(r)(bytes(r.trace_id), r.core, r.end, r.service, r.name, r.attrs)


def test_expand_edge_cases():
    """Duplicates skipped and counted, the earliest of two roots, an unfinished span
    (end 0), an end before the start, a root-less trace."""
    rows = [row(1, 1, None, start_ms=5, end_ms=9), row(1, 2, 1, start_ms=6, end_ms=None),
            row(1, 2, 1, start_ms=6, end_ms=8), row(1, 3, None, start_ms=4, end_ms=3, links=True),
            row(1, 4, 9, start_ms=6, end_ms=7, status=2)]
    result = native.expand(rows)
    assert expanded_view(result) == expanded_view(_expand_rows(rows))
    spans, _, children, orphans, duplicates, root, _, failed = result
    assert failed == [spans[3]]
    assert duplicates == 1 and root.span_id == spans[2].span_id and not spans[1].finished and not root.finished
    assert orphans == [spans[3]]
    assert expanded_view(native.expand(rows[4:])) == expanded_view(_expand_rows(rows[4:]))
    assert native.expand([]) == ([], {}, {}, [], 0, None, [], [])


def test_self_times_in_every_case():
    """What the children of a span cover, clipped to it and counted once: overlapping,
    out of order, beyond either end, unfinished, empty; and an unfinished parent.
    Spans no decoder makes (an end before the start) are left to the reference."""
    from traceguard.models.features import self_times
    from traceguard.records import Trace

    rows = [row(1, 1, None, start_ms=0, end_ms=100),
            row(1, 2, 1, start_ms=50, end_ms=70), row(1, 3, 1, start_ms=10, end_ms=30),  # out of order
            row(1, 4, 1, start_ms=20, end_ms=40),  # overlaps 3
            row(1, 5, 1, start_ms=90, end_ms=150),  # past the parent's end
            row(1, 6, 1, start_ms=60, end_ms=None),  # unfinished: covers nothing
            row(1, 7, 1, start_ms=65, end_ms=65),  # empty
            row(1, 8, None, start_ms=200, end_ms=210), row(1, 9, 8, start_ms=190, end_ms=205),  # one child, from before
            row(1, 10, None, start_ms=300, end_ms=None), row(1, 11, 10, start_ms=300, end_ms=310),  # unfinished parent
            row(1, 12, None, start_ms=400, end_ms=420), row(1, 13, 12, start_ms=430, end_ms=440),  # one child, after
            row(1, 14, None, start_ms=500, end_ms=510), row(1, 15, 14, start_ms=500, end_ms=None)]  # its only child open
    result = native.expand(rows)
    assert expanded_view(result) == expanded_view(_expand_rows(rows))
    ms = 1_000_000
    assert expanded_view(result)[6] == [40 * ms, 20 * ms, 20 * ms, 20 * ms, 60 * ms, None, 0, 5 * ms, 15 * ms, None,
                                         10 * ms, 20 * ms, 10 * ms, 10 * ms, None]
    spans, by_id, children, orphans, _, root, _, _ = result
    spans[0].end = spans[0].start - 1  # finished, yet ending before it starts
    with pytest.raises(native.Unsupported):
        native.self_times(spans, children)
    trace = Trace(spans[0].span_id * 2, spans, by_id, children, orphans, root, "complete", 0, 0)
    assert self_times(trace) == span_self_times(spans, children) and self_times(trace)[0] < 0


def test_latency_keys_samples_and_shape_in_every_case():
    """A CLIENT's callee is its first finished SERVER child in another service:
    not one in its own service, not an unfinished one, not an INTERNAL one; its
    sample is its duration less the callee's, 0 when the callee is longer. The
    shape counts levels, the widest parent, services and the most repeated
    (service, name) under one parent, by pairs and (past 32 children) by a dict."""
    from traceguard.records import KIND_CLIENT, KIND_SERVER

    C, S = KIND_CLIENT, KIND_SERVER
    rows = [row(1, 1, None, start_ms=0, end_ms=100, kind=S, service="front"),
            row(1, 2, 1, start_ms=10, end_ms=50, kind=C, service="front", name="call"),
            row(1, 3, 2, start_ms=12, end_ms=40, kind=S, service="front", name="same service"),
            row(1, 4, 2, start_ms=12, end_ms=None, kind=S, service="back", name="unfinished"),
            row(1, 5, 2, start_ms=12, end_ms=45, kind=1, service="back", name="internal"),
            row(1, 6, 2, start_ms=15, end_ms=45, kind=S, service="back", name="get"),  # the callee: 30 ms
            row(1, 7, 2, start_ms=15, end_ms=48, kind=S, service="back", name="later"),
            row(1, 8, 1, start_ms=60, end_ms=70, kind=C, service="front", name="short"),
            row(1, 9, 8, start_ms=55, end_ms=80, kind=S, service="db", name="q"),  # longer than its caller
            row(1, 10, 1, start_ms=80, end_ms=None, kind=C, service="front", name="open"),
            row(1, 11, 10, start_ms=80, end_ms=90, kind=S, service="db", name="q")]
    rows += [row(1, 100 + i, 5, start_ms=20, end_ms=21, service="db", name=f"q{i % 3}") for i in range(7)]
    spans, by_id, children, orphans, _, root, stages, _ = native.expand(rows)
    self_ns = native.self_times(spans, children)
    keys = native.latency_keys(spans, children, stages)
    samples = native.latency_samples(spans, children, self_ns)
    assert keys == span_latency_keys(spans, children, stages)
    assert samples == span_latency_samples(spans, children, self_ns)
    assert keys[1] == ("back", "get <- front", 6) and keys[7] == ("db", "q <- front", 6)
    assert keys[9] == stages[9] and keys[0] is stages[0]
    ms = 1_000_000
    assert samples[1] == 10 * ms and samples[7] == 0 and samples[9] is None and samples[0] == self_ns[0]
    assert native.shape(root, spans, children) == span_shape(root, spans, children) == (4, 7, 3, 3)
    assert native.shape(None, spans, children)[0] == 0
    # nothing to replace: the very lists come back
    plain = [s for s in spans if s.kind != C]
    own_stages = [(s.service, s.name, s.kind) for s in plain]
    assert native.latency_keys(plain, children, own_stages) is own_stages
    # stage columns: None skipped, a stage's samples summed, new stages while columns are left
    index, reference_index = {keys[1]: 0}, {keys[1]: 0}
    totals = native.stage_totals(keys, samples, index, 3)
    assert totals == stage_totals(keys, samples, reference_index, 3) and index == reference_index
    assert index == {keys[1]: 0, stages[0]: 1, stages[2]: 2}
    assert totals == [10 * ms, self_ns[0], self_ns[2]]
    with pytest.raises(native.Unsupported):  # a sum past 64 bits: left to the reference
        native.stage_totals([stages[0]] * 2, [2 ** 63] * 2, {}, 1)
    # a wide parent: counted with a dict, the same answer
    wide = [row(2, 1, None, start_ms=0, end_ms=10)] + [
        row(2, 2 + i, 1, start_ms=1, end_ms=2, service=f"s{i % 2}", name=f"n{i % 5}") for i in range(200)]
    spans, _, children, _, _, root, _, _ = native.expand(wide)
    assert native.shape(root, spans, children) == span_shape(root, spans, children) == (2, 200, 3, 20)
    # spans no decoder makes are left to the reference
    spans, _, children, _, _, root, stages, _ = native.expand(rows)
    spans[1].kind = "client"
    with pytest.raises(native.Unsupported):
        native.latency_keys(spans, children, stages)
    with pytest.raises(native.Unsupported):
        native.latency_keys(spans, children, stages[1:])


def test_expand_gives_one_tuple_per_stage():
    """Stage-keyed dicts then find their keys by identity, across traces."""
    first = native.expand([row(1, 1, None, start_ms=5, end_ms=9), row(1, 2, 1, start_ms=6, end_ms=8)])[6]
    again = native.expand([row(2, 1, None, start_ms=5, end_ms=9)])[6]
    reference = _expand_rows([row(3, 1, None, start_ms=5, end_ms=9)])[6]
    assert first[0] is again[0] and first[0] == first[1] and reference[0] is _expand_rows([row(4, 1, None)])[6][0]


def test_expand_starts_its_stage_cache_again_when_full():
    """Past 65,536 stages the cache is emptied: stages stay right, before and after."""
    names = [sys.intern(f"op {i}") for i in range(70_000)]
    kept = native.expand([row(1, 1, None, name=names[0])])[6][0]
    for start in range(0, len(names), 1000):
        rows = [row(2, 1 + i, None, name=name) for i, name in enumerate(names[start:start + 1000])]
        assert native.expand(rows)[6] == [("svc", name, 1) for name in names[start:start + 1000]]
    assert kept == ("svc", "op 0", 1)
    assert native.expand([row(1, 1, None, name=names[-1])])[6][0] is native.expand([row(2, 1, None, name=names[-1])])[6][0]


def test_ended_after_parent_matches_the_reference(scenario_proto):
    """The outlived-parent scan in C against its Python reference: the scenario's
    traces (routine and injected outliving), and every way a pair is ruled out."""
    rows = [r for data in read_messages(scenario_proto / "traces.pb")
            for r in decode_traces_message(ExportTraceServiceRequest.FromString(data), CONFIG).rows]
    by_trace: dict[bytes, list] = {}
    for r in rows:
        by_trace.setdefault(r.trace_id, []).append(r)
    found = 0
    for trace_rows in by_trace.values():
        spans, by_id, *_ = _expand_rows(trace_rows)
        for least in (0, 5_000_000):
            pairs = native.ended_after_parent(spans, by_id, least)
            assert pairs == _ended_after_parent(spans, by_id, least)
            found += len(pairs)
    assert found > 100
    edge = [row(1, 1, end_ms=100), row(1, 2, 1, end_ms=106), row(1, 3, 1, end_ms=105),  # 6 ms out, 5 ms exactly
            row(1, 4, 1, end_ms=400, kind=KIND_PRODUCER), row(1, 5, 1, end_ms=400, links=True),
            row(1, 6, 1, end_ms=None), row(1, 7, 6, end_ms=400), row(1, 8, 9, end_ms=400)]  # unfinished parent, orphan
    spans, by_id, *_ = _expand_rows(edge)
    assert native.ended_after_parent(spans, by_id, 5_000_000) == _ended_after_parent(spans, by_id, 5_000_000)
    assert [(c.span_id[-1], p.span_id[-1]) for c, p in native.ended_after_parent(spans, by_id, 5_000_000)] == [(2, 1)]


def test_a_replay_without_the_extension_writes_the_same_bytes(scenario_proto, tmp_path):
    """The fallback wiring: with ``traceguard._rows`` hidden, the Python reference code
    does the whole replay, and its output is byte-identical."""
    import subprocess
    import sys

    outputs = []
    for hide in (False, True):
        out = tmp_path / f"hidden-{hide}.jsonl"
        prelude = "import sys; " + ("sys.modules['traceguard._rows'] = None; " if hide else "")
        code = (prelude + "from traceguard import native; from traceguard.cli import main; "
                f"assert (native.rows is None) == {hide}; sys.exit(main(sys.argv[1:]))")
        result = subprocess.run([sys.executable, "-c", code, "replay", str(scenario_proto / "traces.pb"), "--logs",
                                 str(scenario_proto / "logs.pb"), "--out", str(out), "--no-progress"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") > 50


# ---- OTLP/JSON: decode_json_spans against otlp_json._walk_traces -------------------------

def json_c_walk(document: dict):
    """The C walk's rows (attributes settled), or None where it leaves the document to the reference."""
    stages = StageAttributes()
    try:
        rows, pending, evented = native.decode_json_spans(
            document, stages.known, KEPT_ATTRIBUTES, CONFIG.max_name_length, CONFIG.max_attribute_length,
            UNKNOWN_SERVICE)
    except native.Unsupported:
        return None
    stages.settle(pending)
    return Decoded(rows, events=[log for r, span in evented for log in _event_logs(r, span, CONFIG.max_log_body_length)])


def json_reference(document: dict):
    try:
        return _walk_traces(document, CONFIG, StageAttributes())
    except (AttributeError, TypeError, DecodeError):  # all DecodeError out of decode_traces_json
        return None


def json_compare(document: dict, counts: dict[str, int]) -> None:
    fast, reference = json_c_walk(document), json_reference(document)
    if fast is None:
        counts["left_to_reference"] += 1
        return
    assert reference is not None, f"the C walk accepted a document the reference refuses: {document}"
    same(fast, reference)
    counts["compared"] += 1


def test_the_scenario_json_decodes_the_same_and_entirely_in_c(scenario):
    counts = dict.fromkeys(("left_to_reference", "compared"), 0)
    for line in (scenario / "traces.jsonl").read_bytes().splitlines():
        json_compare(orjson.loads(line), counts)
    assert counts == {"left_to_reference": 0, "compared": counts["compared"]} and counts["compared"] > 20, counts


ODD_VALUES = [None, "", 0, -1, 1 << 64, (1 << 64) - 1, "18446744073709551616", "007", " 7", "-3", "1_0", 3.5, True,
              [], {}, [1], {"a": 1}, "zz" * 16, "AB" * 16, "ab" * 8, "0" * 32, "SPAN_KIND_CLIENT", 2, 3, 6,
              "x" * 300, {"stringValue": "s"}, {"intValue": "12"}, {"intValue": "abc"}, {"boolValue": 1},
              {"doubleValue": 2.5}, {"intValue": 5, "stringValue": "first"}, "service.name", "db.system"]


def mutated(rng: random.Random, node):
    """A copy of a parsed JSON document with one value somewhere replaced, or one key removed."""
    paths = []

    def collect(value, path):
        paths.append(path)
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in children:
            collect(child, (*path, key))

    collect(node, ())
    path = rng.choice(paths[1:])
    copy = orjson.loads(orjson.dumps(node))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return copy


def test_mutated_json_is_decoded_as_the_reference_does_or_left_to_it(scenario):
    """Every odd value anywhere: the C walk either gives the reference's rows or
    leaves the document to it; it never accepts what the reference refuses."""
    rng = random.Random(7)
    documents = []
    for line in (scenario / "traces.jsonl").read_bytes().splitlines()[:3]:
        for resource in orjson.loads(line)["resourceSpans"][:6]:
            for scope in resource.get("scopeSpans", []):
                scope["spans"] = scope["spans"][:4]
            documents.append({"resourceSpans": [resource]})
    counts = dict.fromkeys(("left_to_reference", "compared"), 0)
    for _ in range(6_000):
        json_compare(mutated(rng, rng.choice(documents)), counts)
    assert counts["compared"] > 2_000 and counts["left_to_reference"] > 500, counts


def test_json_nesting_matches_the_reference_across_chunks():
    """Brackets inside strings (with escaped quotes and backslashes) do not count;
    depth and state carry over chunk boundaries that fall anywhere."""
    from traceguard.sources.replay import _json_nesting

    text = (b'{"data": [{"spans": [{"tags": [{"key": "q", "value": "a \\\\\\" [[{ \\\\"}, '
            b'{"key": "[", "value": [[1, [2]], {"x": "}}]]"}]}]}]}]}') * 3
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), 5))
        fast = slow = (0, 0)
        for chunk in (text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])):
            fast, slow = native.json_nesting(chunk, *fast, 64), _json_nesting(chunk, *slow, 64)
            assert fast == slow
        assert fast == (0, 0)
    assert native.json_nesting(b"[" * 100, 0, 0, 64)[0] == 65  # stops at the first bracket past the limit


def test_window_samples_fill_the_windows_as_the_python_does(scenario_proto, monkeypatch):
    """LatencyModel.observe with the C loop and without it: the same windows
    (samples, durations, trace ids, ends, earliest end), the same closed
    windows and regression events, over the scenario with short windows, a
    small cap, a few stages tracked (most left untracked) and hand-made
    zero-length spans and zero samples."""
    import traceguard.models.latency as latency_module
    from traceguard.config import LatencyConfig
    from traceguard.models.features import latency_keys, latency_samples
    from traceguard.models.latency import LatencyModel, beyond_slow_threshold
    from traceguard.records import Trace

    rows = [r for data in read_messages(scenario_proto / "traces.pb")
            for r in decode_traces_message(ExportTraceServiceRequest.FromString(data), CONFIG).rows]
    zero = [row(1, 1, None, start_ms=5, end_ms=5), row(1, 2, 1, start_ms=5, end_ms=5)]  # first: tracked
    by_trace: dict[bytes, list] = {b"zero": zero, b"zero again": zero}
    for r in rows:
        by_trace.setdefault(r.trace_id, []).append(r)

    def traces():
        for trace_id, trace_rows in by_trace.items():
            spans, by_id, children, orphans, _, root, _, _ = native.expand(trace_rows)
            yield Trace(trace_id, spans, by_id, children, orphans, root, "complete", 0, 0)

    def run(with_native: bool):
        monkeypatch.setattr(latency_module, "native", native if with_native else None)
        model = LatencyModel(LatencyConfig(window="20s", max_window_samples=16, max_stages=20))
        closed, events = [], []
        model.on_window = lambda *window: closed.append(window)
        for trace in traces():
            now = max((s.end for s in trace.spans), default=0)
            model.observe(latency_keys(trace), trace.spans, latency_samples(trace), trace.trace_id.hex(), now, events)
        windows = {key: (s.window.index, s.window.self_ns, s.window.total_ns, s.window.trace_ids, s.window.ends,
                         s.window.min_event) for key, s in model.stages_.items() if s.window is not None}
        for n, stage in enumerate(model.stages_.values()):  # half the stages with a bar, at 1 ms
            stage.slow_threshold = 1_000_000 if n % 2 else None
        beyond = [native.beyond_slow_threshold(latency_keys(t), latency_samples(t), model.stages_) for t in traces()]
        assert beyond == [beyond_slow_threshold(latency_keys(t), latency_samples(t), model.stages_) for t in traces()]
        assert sum(map(len, beyond)) > 10 and any(s.slow_threshold is None for s in model.stages_.values())
        model.flush(events)
        return (windows, closed, [(e.stage, e.onset, e.opened_at, e.windows) for e in events],
                model.untracked_samples_, len(model.stages_))

    fast, reference = run(True), run(False)
    assert fast == reference
    windows, closed, _, untracked, tracked = fast
    assert tracked == 20 and len(windows) == 20 and untracked > 1000 and len(closed) > 1000
    assert all(len(w[1]) <= 16 for w in windows.values()) and any(len(w[1]) == 16 for w in windows.values())
