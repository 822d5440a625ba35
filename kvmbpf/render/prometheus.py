"""Prometheus text exposition (format 0.0.4) from any Snapshot's metrics().

Histograms become Prometheus histograms whose `le` bounds are the edges of the
in-kernel log-linear buckets (kvmbpf.hist): for every non-empty bucket
[low, high) we emit `le=high-1` and, when the bucket below it is empty,
`le=low-1` too, so histogram_quantile() interpolates inside the one bucket that
holds the quantile (error <= one bucket width, 6.25 % of the value).  Latency
histograms are exported in seconds (Metric.scale = 1e-9 for nanoseconds).

Cardinality is bounded: at most `max_series` label sets per metric family are
exported (a series, once exported, keeps its place; new ones beyond the cap are
dropped and counted in kvmbpf_exporter_series_dropped{family=...}).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from ..hist import Histogram, slot_bounds
from ..snapshot import Metric

#: Default cap on label sets per metric family (documented in `kvmbpf export --help`).
DEFAULT_MAX_SERIES = 2000
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BAD_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_BAD_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(name: str) -> str:
    """A valid Prometheus metric name (invalid characters become '_')."""
    name = _BAD_NAME.sub("_", name)
    return name if name and not name[0].isdigit() else f"_{name}"


def label_name(name: str) -> str:
    name = _BAD_LABEL.sub("_", name)
    return name if name and not name[0].isdigit() else f"_{name}"


def escape_label_value(value: object) -> str:
    """Backslash, double quote and newline escaped as the text format requires."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers without a decimal point, floats in their shortest exact form."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def le_buckets(hist: Histogram) -> list[tuple[int, int]]:
    """Cumulative (inclusive upper bound, count) pairs in the histogram's own units.

    Each non-empty bucket contributes its upper edge; its lower edge is added
    (with the count below it) when the bucket underneath is empty, so that
    Prometheus never interpolates across a run of empty buckets.
    """
    out: list[tuple[int, int]] = []
    running, previous = 0, None
    for slot in sorted(s for s, n in hist.buckets.items() if n > 0):
        low, high = slot_bounds(slot)
        if low > 0 and previous != slot - 1:
            out.append((low - 1, running))
        running += hist.buckets[slot]
        out.append((high - 1, running))
        previous = slot
    return out


def _labels_text(labels: dict[str, str], extra: tuple[str, str] | None = None) -> str:
    pairs = [(label_name(k), escape_label_value(v)) for k, v in sorted(labels.items())]
    if extra:
        pairs.append(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def _scaled(value: float, scale: float) -> float:
    """value * scale; for scales like 1e-9 (ns -> s) a division, which rounds exactly."""
    if 0 < scale < 1 and abs(1 / scale - round(1 / scale)) < 1e-6:
        return value / round(1 / scale)
    return value * scale


@dataclass
class Family:
    """All series of one metric name, label sets merged (duplicates summed, never repeated)."""
    name: str
    kind: str
    help: str
    series: dict[tuple, Metric] = field(default_factory=dict)

    def add(self, metric: Metric) -> None:
        key = tuple(sorted((label_name(k), str(v)) for k, v in metric.labels.items()))
        old = self.series.get(key)
        if old is None:
            self.series[key] = Metric(metric.name, metric.kind, metric.help, dict(metric.labels),
                                      metric.value, metric.hist, metric.scale)
        elif metric.hist is not None and old.hist is not None:
            old.hist = old.hist + metric.hist
        else:
            old.value += metric.value

    def lines(self) -> list[str]:
        kind = self.kind if self.kind in ("counter", "gauge", "histogram") else "untyped"
        out = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {kind}"]
        for metric in self.series.values():
            if kind == "histogram":
                out += _histogram_lines(self.name, metric)
            else:
                out.append(f"{self.name}{_labels_text(metric.labels)} {format_value(metric.value)}")
        return out


def _histogram_lines(name: str, metric: Metric) -> list[str]:
    hist = metric.hist or Histogram()
    out = [f"{name}_bucket{_labels_text(metric.labels, ('le', format_value(_scaled(le, metric.scale))))}"
           f" {count}" for le, count in le_buckets(hist)]
    out.append(f"{name}_bucket{_labels_text(metric.labels, ('le', '+Inf'))} {hist.count}")
    out.append(f"{name}_sum{_labels_text(metric.labels)} {format_value(_scaled(hist.total, metric.scale))}")
    out.append(f"{name}_count{_labels_text(metric.labels)} {hist.count}")
    return out


class SeriesLimiter:
    """Caps label sets per family; a series admitted once stays admitted (no flapping)."""

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES):
        self.max_series = max_series
        self.admitted: dict[str, set[tuple]] = {}
        self.dropped: dict[str, int] = {}

    def filter(self, family: Family) -> None:
        """Drop the series of `family` beyond the cap; record how many were dropped."""
        known = self.admitted.setdefault(family.name, set())
        dropped = 0
        for key in list(family.series):
            if key in known:
                continue
            if len(known) < self.max_series:
                known.add(key)
            else:
                del family.series[key]
                dropped += 1
        self.dropped[family.name] = dropped


def families(metrics: Iterable[Metric]) -> list[Family]:
    """Group metrics by name (first kind and help win), in order of first appearance."""
    out: dict[str, Family] = {}
    for metric in metrics:
        name = metric_name(metric.name)
        fam = out.setdefault(name, Family(name, metric.kind, metric.help))
        if metric.kind == fam.kind:
            fam.add(metric)
    return list(out.values())


def render(metrics: Iterable[Metric], limiter: SeriesLimiter) -> str:
    """The exposition text for `metrics`, limited, plus the limiter's dropped-series counts."""
    lines: list[str] = []
    for fam in families(metrics):
        limiter.filter(fam)
        lines += fam.lines()
    dropped = Family("kvmbpf_exporter_series_dropped", "gauge",
                     "Series left out of the latest scrape because their family hit --max-series.")
    for name, n in sorted(limiter.dropped.items()):
        dropped.add(Metric(dropped.name, "gauge", dropped.help, {"family": name}, n))
    if dropped.series:
        lines += dropped.lines()
    return "\n".join(lines) + "\n"
