"""Decoders: wire bytes or parsed JSON → span rows and log rows, plus rejects.

A decoder never raises for a bad span or log record: it counts it as rejected
and keeps a few messages, so each edge can answer in its own protocol (OTLP
partial success, a file:line message, a dead-letter record). Only a body that
cannot be read at all raises ``DecodeError``.
"""

from traceguard.decode.common import DecodeError, Decoded
from traceguard.decode.otlp_json import decode_json_line, decode_logs_json, decode_traces_json
from traceguard.decode.otlp_proto import decode_logs_proto, decode_traces_proto

__all__ = [
    "DecodeError",
    "Decoded",
    "decode_json_line",
    "decode_logs_json",
    "decode_logs_proto",
    "decode_traces_json",
    "decode_traces_proto",
]
