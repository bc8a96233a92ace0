"""The span-row code in C (``_rows.c``), bound to the record classes and the schema.

``rows`` is None where the extension is not built (a source checkout without
``pip install``): the Python reference code in ``decode/otlp_proto.py`` and
``assemble/assembler.py`` then does the same work, slower.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from traceguard.records import LogRow, Span, SpanRow


def wire_schema(*roots: Descriptor) -> tuple[list[list[tuple[int, int, int, bool, bool]]], dict[str, int]]:
    """Every message type reachable from the ``roots``, the first root first, each as its fields'
    (number, FieldDescriptor type, index of the field's message type or -1,
    repeated, in a oneof); and the index of each type by full name.

    Taken from the installed descriptors, so the C walk checks the same schema
    upb parses with, whichever opentelemetry-proto version is installed."""
    index: dict[str, int] = {}
    messages: list[list[tuple[int, int, int, bool, bool]]] = []

    def visit(message: Descriptor) -> int:
        if message.full_name not in index:
            index[message.full_name] = len(messages)
            fields: list[tuple[int, int, int, bool, bool]] = []
            messages.append(fields)
            for field in message.fields:
                child = visit(field.message_type) if field.type in (
                    FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP) else -1
                fields.append((field.number, field.type, child, field.is_repeated,
                               field.containing_oneof is not None))
        return index[message.full_name]

    for root in roots:
        visit(root)
    return messages, index


try:
    from traceguard import _rows as rows
except ImportError:
    rows = None
else:
    _messages, _index = wire_schema(ExportTraceServiceRequest.DESCRIPTOR, ExportLogsServiceRequest.DESCRIPTOR)
    rows.bind(SpanRow, Span, LogRow, _messages, _index[AnyValue.DESCRIPTOR.full_name],
              _index[ExportLogsServiceRequest.DESCRIPTOR.full_name])


def in_c(name: str, reference, *args):
    """``rows.<name>(*args)``, or the Python ``reference`` where the extension is
    not built or raises Unsupported (values no decoder makes: the reference says)."""
    if rows is None:
        return reference(*args)
    try:
        return getattr(rows, name)(*args)
    except rows.Unsupported:
        return reference(*args)
