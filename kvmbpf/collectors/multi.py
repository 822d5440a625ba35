"""Several collectors in one loop: the ones this kernel supports, and why the others are off.

`top`, `export` and `record` want every question answered at once.  The
MultiCollector starts each collector the kernel can run (kernel.collect() says
which tracepoints are present), keeps going without the ones that fail to
load, and its MultiSnapshot carries each part's Snapshot plus the reasons the
others are off, so renderers stay collector-agnostic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import kernel
from ..errors import KvmbpfError
from ..snapshot import Metric, TableData
from ..session import Collector
from .base import BaseCollector, Scope
from .blk import BlkCollector
from .cpu import CpuCollector
from .exits import ExitsCollector
from .net import NetCollector
from .steal import StealCollector

#: Every collector the multi-collector can run, by name, built from a shared Scope.
FACTORIES: dict[str, Callable[[Scope], Collector]] = {
    "exits": ExitsCollector,
    "steal": StealCollector,
    "cpu": CpuCollector,
    "blk": BlkCollector,
    "net": NetCollector,
}


@dataclass
class MultiSnapshot:
    """One interval of every running collector (`parts`), and why the others are off."""
    interval_s: float
    time: float                                  # Unix time at the end of the interval
    parts: dict[str, Any]                        # collector name -> its Snapshot
    off: dict[str, str] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=dict)     # attached probes per collector
    overflow: dict[str, int] = field(default_factory=dict)   # events lost to full maps, cumulative
    missed: dict[str, int] = field(default_factory=dict)     # events the kernel kept from BPF, cumulative

    def headline(self) -> str:
        return "; ".join(part.headline() for part in self.parts.values())

    def tables(self, top: int) -> list[TableData]:
        out = [t for part in self.parts.values() for t in part.tables(top)]
        if self.off:
            out.append(TableData("collectors off", ["collector", "why"],
                                 [[name, why] for name, why in self.off.items()]))
        return out

    def metrics(self) -> list[Metric]:
        out = [m for part in self.parts.values() for m in part.metrics()]
        for name in self.parts:
            out.append(Metric("kvmbpf_collector_enabled", "gauge",
                              "1 when the collector runs, 0 when it is off (reason in `why`)",
                              {"collector": name, "why": ""}, 1))
        for name, why in self.off.items():
            out.append(Metric("kvmbpf_collector_enabled", "gauge",
                              "1 when the collector runs, 0 when it is off (reason in `why`)",
                              {"collector": name, "why": why}, 0))
        for name, n in self.probes.items():
            out.append(Metric("kvmbpf_probes", "gauge", "BPF probes attached by the collector",
                              {"collector": name}, n))
        for name, n in self.overflow.items():
            out.append(Metric("kvmbpf_map_overflow_total", "counter",
                              "Events a collector could not record because a bounded map was full",
                              {"collector": name}, n))
        for name, n in self.missed.items():
            out.append(Metric("kvmbpf_missed_events_total", "counter",
                              "Events the kernel did not run a collector's BPF program for (another "
                              "BPF program was running on that CPU)", {"collector": name}, n))
        return out


def probe_count(collector: Collector) -> int:
    """Tracepoints, kprobes and uprobes the collector's program holds open (0: /proc only)."""
    bpf = collector.program.bpf if isinstance(collector, BaseCollector) else None
    if bpf is None:
        return 0
    return bpf.num_open_tracepoints() + bpf.num_open_kprobes() + bpf.num_open_uprobes() + len(
        getattr(bpf, "raw_tracepoint_fds", {}))


class MultiCollector:
    """Runs the wanted collectors that this kernel supports; at least one must start."""

    def __init__(self, scope: Scope, wanted: tuple[str, ...] = (),
                 status: dict[str, str | None] | None = None):
        unknown = [name for name in wanted if name not in FACTORIES]
        if unknown:
            raise KvmbpfError(f"unknown collector {unknown[0]!r} "
                              f"(collectors: {', '.join(FACTORIES)})")
        scope.refresh(strict=True)      # an unknown --vm is the user's error, not a collector's
        status = kernel.collect().collectors if status is None else status
        self.collectors: dict[str, Collector] = {}
        self.off: dict[str, str] = {}
        try:
            for name in wanted or tuple(FACTORIES):
                self._start(name, scope, status.get(name))
        except BaseException:
            self.close()
            raise
        if not self.collectors:
            raise KvmbpfError("no collector can run here: " + "; ".join(
                f"{name}: {why}" for name, why in self.off.items()))

    def _start(self, name: str, scope: Scope, why_off: str | None) -> None:
        if why_off:
            self.off[name] = why_off
            return
        try:
            self.collectors[name] = FACTORIES[name](scope)
        except KvmbpfError as exc:
            self.off[name] = str(exc)

    def snapshot(self) -> MultiSnapshot:
        parts = {name: c.snapshot() for name, c in self.collectors.items()}
        interval = max((getattr(p, "interval_s", 0.0) for p in parts.values()), default=0.0)
        return MultiSnapshot(interval, time.time(), parts, dict(self.off),
                             {name: probe_count(c) for name, c in self.collectors.items()},
                             {name: c.overflow() for name, c in self.collectors.items()
                              if isinstance(c, BaseCollector)},
                             {name: c.program.missed_events() for name, c in self.collectors.items()
                              if isinstance(c, BaseCollector)})

    def close(self) -> None:
        for collector in self.collectors.values():
            collector.close()
