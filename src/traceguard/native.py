"""The span-row code in C (``_rows.c``), bound to the record classes.

``rows`` is None where the extension is not built (a source checkout without
``pip install``): the Python reference code in ``decode/otlp_proto.py`` and
``assemble/assembler.py`` then does the same work, slower.
"""

from __future__ import annotations

from traceguard.records import Span, SpanRow

try:
    from traceguard import _rows as rows
except ImportError:
    rows = None
else:
    rows.bind(SpanRow, Span)
