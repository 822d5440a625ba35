"""The interval loop every tracing command shares: read, render, repeat, and always clean up.

Ctrl-C and SIGTERM end the loop the same way: the partial interval collected so
far is read and rendered once more, then every probe detaches.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from .errors import KvmbpfError


class Collector(Protocol):
    def snapshot(self) -> object:
        """What happened since the previous call (the first call: since start)."""

    def close(self) -> None:
        """Detach every probe."""


@dataclass(frozen=True)
class Timing:
    interval: float | None   # seconds between outputs; None = one output at the end
    count: int | None        # number of outputs; None = until duration or Ctrl-C
    duration: float | None   # total seconds; None = until count or Ctrl-C

    def validate(self) -> "Timing":
        if self.interval is not None and self.interval <= 0:
            raise KvmbpfError(f"interval must be > 0 (got {self.interval:g})")
        if self.count is not None and self.count <= 0:
            raise KvmbpfError(f"count must be > 0 (got {self.count})")
        if self.duration is not None and self.duration <= 0:
            raise KvmbpfError(f"duration must be > 0 (got {self.duration:g})")
        return self


class _Stop(Exception):
    pass


class _StopSignals:
    """SIGINT/SIGTERM end the run: at once while sleeping, after the read while reading.

    A signal that lands in the middle of snapshot() or emit() must not lose that
    interval, so it only sets a flag there; the loop then emits once more, covering
    what arrived during that read, and stops.
    """

    def __init__(self) -> None:
        self.requested = False
        self.sleeping = False
        self.saved: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self.sleeping:
            raise _Stop()


def run(collector: Collector, timing: Timing, emit: Callable[[object], None],
        on_tick: Callable[[], None] | None = None) -> int:
    """Drive a collector: emit one snapshot per interval; returns the number emitted."""
    emitted = 0
    start = time.monotonic()
    stopped_before_read = False
    try:
        with _StopSignals() as signals:
            while not signals.requested:
                wait = _next_wait(timing, start, emitted)
                if wait is None:
                    break
                signals.sleeping = True
                try:
                    _sleep(wait)
                except _Stop:
                    pass
                finally:
                    signals.sleeping = False
                if on_tick and not signals.requested:
                    on_tick()
                stopped_before_read = signals.requested
                emit(collector.snapshot())
                emitted += 1
            if signals.requested and not stopped_before_read:
                emit(collector.snapshot())      # what arrived while the last one was read
                emitted += 1
    finally:
        collector.close()
    return emitted


def _next_wait(timing: Timing, start: float, emitted: int) -> float | None:
    """Seconds until the next output, or None when the run is over."""
    if timing.count is not None and emitted >= timing.count:
        return None
    elapsed = time.monotonic() - start
    if timing.duration is not None and elapsed >= timing.duration - 1e-3:
        return None
    if timing.interval is None:
        return (timing.duration - elapsed) if timing.duration is not None else float("inf")
    wait = timing.interval * (emitted + 1) - elapsed
    if timing.duration is not None:
        wait = min(wait, timing.duration - elapsed)
    return max(0.0, wait)


def _sleep(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))
