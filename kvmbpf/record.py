"""Recordings: interval snapshots in a JSON-lines file, read back for summaries and diffs.

Line 1 is a header ({"kvmbpf_recording": 1, ...}); every later line is one
interval: its Snapshot as plain data (the JSON schema of `--json`) and its
cumulative metrics() (histograms as [[slot, count], ...] in the kvmbpf.hist
layout).  Summaries and diffs use the metrics only, so they need no knowledge
of any collector: counters become rates, histograms percentiles.

Each line is written with SIGINT/SIGTERM blocked and flushed at once, so an
interrupted `record` leaves a file whose every line is whole.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import KvmbpfError
from .hist import Histogram
from .snapshot import Metric, plain

FORMAT_VERSION = 1
HEADER_KEY = "kvmbpf_recording"


# --- writing --------------------------------------------------------------------------------
def encode_metric(metric: Metric) -> dict[str, Any]:
    out: dict[str, Any] = {"name": metric.name, "kind": metric.kind, "labels": metric.labels}
    if metric.hist is not None:
        out["buckets"] = metric.hist.buckets_as_list()
        out["scale"] = metric.scale
    else:
        out["value"] = metric.value
    return out


def decode_metric(data: dict[str, Any]) -> Metric:
    hist = None
    if "buckets" in data:
        hist = Histogram.from_list(data["buckets"])
    return Metric(str(data["name"]), str(data["kind"]), "", {str(k): str(v) for k, v in
                                                             data.get("labels", {}).items()},
                  float(data.get("value", 0.0)), hist, float(data.get("scale", 1.0)))


class Recorder:
    """Appends one line per interval to an open file, whole lines only."""

    def __init__(self, out: IO[str], collectors: list[str], off: dict[str, str]):
        self.out = out
        self._write({HEADER_KEY: FORMAT_VERSION, "started": time.time(),
                     "host": socket.gethostname(), "kernel": platform.release(),
                     "collectors": collectors, "off": off})

    def add(self, snapshot: Any) -> None:
        self._write({"time": getattr(snapshot, "time", time.time()),
                     "interval_s": snapshot.interval_s, "snapshot": plain(snapshot),
                     "metrics": [encode_metric(m) for m in snapshot.metrics()]})

    def _write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.out.write(line)
            self.out.flush()
            os.fsync(self.out.fileno())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --- reading --------------------------------------------------------------------------------
@dataclass
class Interval:
    time: float
    interval_s: float
    snapshot: dict[str, Any]
    metrics: list[Metric]


@dataclass
class Recording:
    path: str
    header: dict[str, Any]
    intervals: list[Interval] = field(default_factory=list)
    truncated: bool = False        # the last line was cut short (writer killed mid-line)

    @property
    def duration_s(self) -> float:
        return sum(i.interval_s for i in self.intervals)

    def final(self) -> dict[tuple, Metric]:
        """The cumulative value of every series at the end of the recording."""
        return series(self.intervals[-1].metrics) if self.intervals else {}


def series_key(metric: Metric) -> tuple:
    return (metric.name, tuple(sorted(metric.labels.items())))


def series(metrics: list[Metric]) -> dict[tuple, Metric]:
    """Metrics by (name, labels); duplicates (same labels) summed."""
    out: dict[tuple, Metric] = {}
    for m in metrics:
        key = series_key(m)
        if key not in out:
            out[key] = Metric(m.name, m.kind, m.help, m.labels, m.value,
                              Histogram(dict(m.hist.buckets)) if m.hist else None, m.scale)
        elif m.hist is not None and out[key].hist is not None:
            out[key].hist = out[key].hist + m.hist
        else:
            out[key].value += m.value
    return out


def load(path: str) -> Recording:
    """Read a recording; unreadable or corrupt input is a one-line KvmbpfError."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise KvmbpfError(f"cannot read recording {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KvmbpfError(f"{path} is not a kvmbpf recording (not UTF-8 text)") from None
    lines = text.split("\n")
    truncated = bool(lines[-1])          # a last line without its newline was cut short
    whole = lines[:-1]
    if not whole or not whole[0].strip():
        raise KvmbpfError(f"{path} is not a kvmbpf recording (empty or no header line)")
    header = _parse(path, 1, whole[0])
    if not isinstance(header, dict) or header.get(HEADER_KEY) != FORMAT_VERSION:
        raise KvmbpfError(f"{path} is not a kvmbpf recording (no '{HEADER_KEY}: "
                          f"{FORMAT_VERSION}' header)")
    rec = Recording(path, header, truncated=truncated)
    for lineno, line in enumerate(whole[1:], start=2):
        if line.strip():
            rec.intervals.append(_interval(path, lineno, _parse(path, lineno, line)))
    return rec


def _parse(path: str, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise KvmbpfError(f"{path}:{lineno}: corrupt recording line ({exc})") from None


def _interval(path: str, lineno: int, obj: Any) -> Interval:
    try:
        return Interval(float(obj["time"]), float(obj["interval_s"]), obj.get("snapshot", {}),
                        [decode_metric(m) for m in obj["metrics"]])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KvmbpfError(f"{path}:{lineno}: corrupt recording line "
                          f"(bad or missing field {exc})") from None


# --- summaries and diffs --------------------------------------------------------------------
@dataclass
class SeriesSummary:
    """One series over a whole recording: a rate (counters), a level (gauges) or percentiles."""
    name: str
    kind: str
    labels: dict[str, str]
    rate: float = 0.0                          # counters: per second; histograms: samples/s
    total: float = 0.0                         # counters: the total; gauges: the mean
    percentiles: dict[str, float] = field(default_factory=dict)   # histograms, scaled
    scale: float = 1.0                         # 1e-9: percentiles are seconds


def summarize(rec: Recording) -> list[SeriesSummary]:
    """Every series of the recording, sorted by name then by rate (largest first)."""
    duration = rec.duration_s or 1.0
    gauges = _gauge_means(rec)
    out = []
    for key, m in rec.final().items():
        s = SeriesSummary(m.name, m.kind, m.labels, scale=m.scale)
        if m.hist is not None:
            s.total = m.hist.count
            s.rate = m.hist.count / duration
            s.percentiles = {k: v * m.scale for k, v in m.hist.percentiles().items()}
        elif m.kind == "gauge":
            s.total = gauges[key]
        else:
            s.total, s.rate = m.value, m.value / duration
        out.append(s)
    return sorted(out, key=lambda s: (s.name, -s.rate, -s.total, sorted(s.labels.items())))


def _gauge_means(rec: Recording) -> dict[tuple, float]:
    sums: dict[tuple, list[float]] = {}
    for interval in rec.intervals:
        for key, m in series(interval.metrics).items():
            if m.kind == "gauge":
                sums.setdefault(key, []).append(m.value)
    return {key: sum(v) / len(v) for key, v in sums.items()}


@dataclass
class SeriesDiff:
    """One series in two recordings: the value that matters for its kind, before and after."""
    name: str
    kind: str
    labels: dict[str, str]
    what: str                 # "rate/s", "mean", "p50", "p99", ...
    before: float | None
    after: float | None
    scale: float = 1.0

    @property
    def change_pct(self) -> float | None:
        if self.before is None or self.after is None or self.before == 0:
            return None
        return 100.0 * (self.after - self.before) / self.before


def diff(before: Recording, after: Recording) -> list[SeriesDiff]:
    """Rates, gauge means and p50/p99 of every series found in either recording."""
    old = {(s.name, tuple(sorted(s.labels.items()))): s for s in summarize(before)}
    new = {(s.name, tuple(sorted(s.labels.items()))): s for s in summarize(after)}
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        ref = a or b
        for what, get in _diff_values(ref):
            out.append(SeriesDiff(ref.name, ref.kind, ref.labels, what,
                                  get(a) if a else None, get(b) if b else None, ref.scale))
    return out


def _diff_values(s: SeriesSummary):
    if s.kind == "histogram":
        return [("rate/s", lambda x: x.rate), ("p50", lambda x: x.percentiles.get("p50")),
                ("p99", lambda x: x.percentiles.get("p99"))]
    if s.kind == "gauge":
        return [("mean", lambda x: x.total)]
    return [("rate/s", lambda x: x.rate)]


# --- plot -----------------------------------------------------------------------------------
def interval_histograms(rec: Recording, name: str) -> list[tuple[float, Histogram, float]]:
    """Per interval: (time, histogram of that interval over all series of `name`, scale)."""
    out, previous = [], Histogram()
    for interval in rec.intervals:
        total, scale = Histogram(), 1.0
        for m in interval.metrics:
            if m.name == name and m.hist is not None:
                total, scale = total + m.hist, m.scale
        delta = total - previous          # a series that went away must not count negative
        out.append((interval.time, Histogram({s: n for s, n in delta.buckets.items() if n > 0}),
                    scale))
        previous = total
    return out


def histogram_names(rec: Recording) -> list[str]:
    return sorted({m.name for i in rec.intervals for m in i.metrics if m.hist is not None})


def plot(rec: Recording, out_path: str, max_families: int = 6) -> list[str]:
    """Heatmaps of every latency histogram over time, with p50 and p99 lines; returns the names."""
    import matplotlib  # noqa: PLC0415 (only `report --plot` needs it)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from .hist import slot_bounds  # noqa: PLC0415
    names = histogram_names(rec)[:max_families]
    if not names:
        raise KvmbpfError(f"{rec.path} has no histograms to plot")
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    t0 = rec.intervals[0].time - rec.intervals[0].interval_s
    for ax, name in zip(axes[:, 0], names):
        rows = interval_histograms(rec, name)
        slots = sorted({s for _, h, _ in rows for s, n in h.buckets.items() if n > 0})
        if not slots:
            ax.set_title(f"{name}: no samples")
            continue
        scale = rows[0][2]
        lo, hi = slots[0], slots[-1]
        edges_y = [slot_bounds(s)[0] * scale for s in range(lo, hi + 1)] + [slot_bounds(hi)[1] * scale]
        edges_x = [t0] + [t for t, _, _ in rows]
        grid = [[0.0] * len(rows) for _ in range(hi - lo + 1)]
        for col, (_, h, _) in enumerate(rows):
            count = h.count
            for s, n in h.buckets.items():
                if count > 0 and n > 0:
                    grid[s - lo][col] = n / count
        xs = [t - t0 for t in edges_x]
        mesh = ax.pcolormesh(xs, [max(y, scale / 2) for y in edges_y], grid, cmap="viridis",
                             shading="flat")
        fig.colorbar(mesh, ax=ax, label="share of interval")
        mids = [(xs[i] + xs[i + 1]) / 2 for i in range(len(rows))]
        for pct, style in (("p50", "w--"), ("p99", "r-")):
            ys = [h.percentiles().get(pct, float("nan")) * s if h.count else float("nan")
                  for _, h, s in rows]
            ax.plot(mids, ys, style, label=pct, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("seconds" if scale != 1.0 else "value")
        ax.legend(loc="upper right")
    fig.tight_layout()
    try:
        fig.savefig(out_path, dpi=90)
    except OSError as exc:
        raise KvmbpfError(f"cannot write {out_path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return names
