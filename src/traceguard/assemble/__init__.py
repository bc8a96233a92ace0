"""Assembly: span rows → whole traces, decided by the time policy of DESIGN.md."""

from traceguard.assemble.assembler import TraceAssembler
from traceguard.assemble.clock import Clock, EventTimeClock, WallClock

__all__ = ["Clock", "EventTimeClock", "TraceAssembler", "WallClock"]
