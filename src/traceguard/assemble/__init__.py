"""Assembly: span rows → whole traces, decided by the time policy of DESIGN.md."""

from traceguard.assemble.assembler import TraceAssembler
from traceguard.assemble.clock import Clock, EventTimeClock, SetClock, WallClock

__all__ = ["Clock", "EventTimeClock", "SetClock", "TraceAssembler", "WallClock"]
