"""traceguard: distributed-trace anomaly detection over OpenTelemetry data.

The package layout follows the data flow: ``sources`` → ``decode`` →
``assemble`` → ``detect`` (+ ``models`` for learned estimators) → ``link`` →
``sinks``. ``records`` holds the data contract shared by every stage and
``pipeline`` wires the stages; ``cli`` holds the thin front ends.
"""

__version__ = "0.1.0"
