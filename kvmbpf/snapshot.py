"""What every collector's Snapshot offers the renderers: plain data, no BPF.

A collector returns one Snapshot per interval.  Renderers ask it for
`to_dict()` (JSON lines), `tables()` (terminal) and `metrics()` (Prometheus),
so adding a collector never touches a renderer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .hist import Histogram


@dataclass
class TableData:
    """One terminal table: a title, column names, rows of cells, and footnotes."""
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Metric:
    """One Prometheus sample (counter or gauge) or histogram, cumulative since start."""
    name: str
    kind: str                      # "counter" | "gauge" | "histogram"
    help: str
    labels: dict[str, str]
    value: float = 0.0
    hist: Histogram | None = None
    scale: float = 1.0             # histogram values are multiplied by this (ns -> s)


def plain(obj: Any) -> Any:
    """Dataclasses -> dicts, Histograms -> percentile summaries (the JSON schema's shape)."""
    if isinstance(obj, Histogram):
        return {"count": obj.count, **obj.percentiles(), "buckets": obj.buckets_as_list()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.name.startswith("_")}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def fmt_ns(ns: float | int | None) -> str:
    """A duration for humans: 850ns, 12.3us, 4.56ms, 1.23s."""
    if ns is None:
        return "-"
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= div:
            return f"{ns / div:.3g}{unit}"
    return f"{int(ns)}ns"


def latency_cells(hist: Histogram) -> list[str]:
    """p50, p90, p99, p99.9, max columns of a latency histogram (ns)."""
    pct = hist.percentiles()
    return [fmt_ns(pct.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max")]


LATENCY_COLUMNS = ["p50", "p90", "p99", "p99.9", "max"]


def loss_notes(overflow: int, missed: int) -> list[str]:
    """The footnotes every collector shows for events it could not count (never silent)."""
    notes = []
    if overflow:
        notes.append(f"{overflow} events not recorded since start: a bounded map was full")
    if missed:
        notes.append(f"{missed} events missed this interval: the kernel skipped our programs while "
                     "another BPF program ran on that CPU; counts may be short by as many")
    return notes
