"""`kvmbpf top`: a live per-VM view built from the running collectors' metrics().

Every collector exports cumulative metrics labelled by `vm`; the view takes
the difference of two consecutive snapshots, so a row is a set of per-second
rates and interval percentiles per VM.  COLUMNS names the metric families the
screen shows; nothing else here knows a collector.  The drill-down view lists
every series of one VM (per vCPU, reason, device, ...).
"""
from __future__ import annotations

import os
import select
import signal
import sys
import termios
import time
import tty
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..hist import Histogram
from ..record import series
from ..snapshot import Metric, fmt_ns


@dataclass(frozen=True)
class Column:
    """One per-VM column: metric families (the first one a VM has wins) and how to reduce them."""
    header: str
    families: tuple[str, ...]
    how: str                                   # "rate" (sum /s), "p99" (s), "pct" (s/s per series, %)
    match: tuple[tuple[str, str], ...] = ()    # only series with these labels
    width: int = 7


#: Hosts whose KVM never emits kvm_exit (PVM) fall back to exits to the VMM for exit columns.
EXITS = ("kvmbpf_exits_total", "kvmbpf_userspace_exits_total")
COLUMNS = (
    Column("exits/s", EXITS, "rate", width=8),
    Column("exit p99", ("kvmbpf_exit_latency_seconds", "kvmbpf_vmm_time_seconds"), "p99", width=8),
    Column("steal%", ("kvmbpf_steal_wait_seconds_total",), "pct", width=6),
    Column("IOPS", ("kvmbpf_blk_requests_total",), "rate", width=6),
    Column("io p99", ("kvmbpf_blk_latency_seconds",), "p99", (("interval", "queue"),), width=7),
    Column("pkt/s", ("kvmbpf_net_packets_total",), "rate", width=7),
    Column("drops", ("kvmbpf_net_drops_total",), "rate", width=5),
)
REASONS = Column("top reasons", EXITS, "rate", width=12)
SORT_KEYS = ("name",) + tuple(c.header for c in COLUMNS)


@dataclass(frozen=True)
class Thresholds:
    """When a row is flagged: one exit reason above `exit_rate`/s, or steal above `steal_pct`."""
    exit_rate: float = 10_000.0
    steal_pct: float = 10.0


@dataclass
class Delta:
    """One series over one interval: a per-second rate, a gauge level or a histogram."""
    metric: Metric
    rate: float = 0.0
    hist: Histogram | None = None


def deltas(prev: dict[tuple, Metric], cur: dict[tuple, Metric], interval_s: float) -> list[Delta]:
    """Per-interval values of every current series (a new series counts from zero)."""
    out = []
    secs = interval_s if interval_s > 0 else 1.0
    for key, m in cur.items():
        old = prev.get(key)
        if m.hist is not None:
            hist = m.hist - old.hist if old is not None and old.hist is not None else m.hist
            hist = Histogram({s: n for s, n in hist.buckets.items() if n > 0})
            out.append(Delta(m, hist.count / secs, hist))
        elif m.kind == "counter":
            out.append(Delta(m, max(0.0, m.value - (old.value if old else 0.0)) / secs))
        else:
            out.append(Delta(m, m.value))
    return out


@dataclass
class VmRow:
    vm: str
    values: dict[str, float | None]
    reasons: list[tuple[str, float]]           # (reason, rate), largest first
    alerts: list[str] = field(default_factory=list)


def _select(col: Column, ds: list[Delta]) -> list[Delta]:
    """The deltas of the first of the column's families that has any series here."""
    for family in col.families:
        mine = [d for d in ds if d.metric.name == family
                and all(d.metric.labels.get(k) == v for k, v in col.match)]
        if mine:
            return mine
    return []


def reduce(col: Column, ds: list[Delta]) -> float | None:
    """One VM's value for a column (None: no collector has such series for it)."""
    mine = _select(col, ds)
    if not mine:
        return None
    if col.how == "p99":
        merged = Histogram()
        for d in mine:
            merged = merged + (d.hist or Histogram())
        return merged.percentiles((99.0,)).get("p99", 0) * mine[0].metric.scale if merged.count else None
    if col.how == "pct":
        return 100.0 * sum(d.rate for d in mine) / len(mine)
    return sum(d.rate for d in mine)


def vm_rows(ds: list[Delta], limits: Thresholds) -> list[VmRow]:
    """One row per VM (every VM any collector labels), with its alerts."""
    by_vm: dict[str, list[Delta]] = {}
    for d in ds:
        if d.metric.labels.get("vm"):           # "" = not a VM's (a bridge, the host)
            by_vm.setdefault(d.metric.labels["vm"], []).append(d)
    rows = []
    for vm, mine in sorted(by_vm.items()):
        reasons: dict[str, float] = {}
        for d in _select(REASONS, mine):
            if "reason" in d.metric.labels:
                reasons[d.metric.labels["reason"]] = reasons.get(d.metric.labels["reason"], 0) + d.rate
        row = VmRow(vm, {c.header: reduce(c, mine) for c in COLUMNS},
                    sorted(reasons.items(), key=lambda kv: -kv[1]))
        row.alerts += [f"{reason} {rate:,.0f}/s" for reason, rate in row.reasons if rate > limits.exit_rate]
        steal = row.values.get("steal%")
        if steal is not None and steal > limits.steal_pct:
            row.alerts.append(f"steal {steal:.0f}%")
        rows.append(row)
    return rows


def sort_rows(rows: list[VmRow], key: str, name_filter: str) -> list[VmRow]:
    rows = [r for r in rows if name_filter.lower() in r.vm.lower()]
    if key == "name":
        return sorted(rows, key=lambda r: r.vm)
    return sorted(rows, key=lambda r: (-(r.values.get(key) or 0.0), r.vm))


def cell(col: Column, value: float | None) -> str:
    if value is None:
        return "-"
    if col.how == "p99":
        return fmt_ns(value * 1e9)
    if col.how == "pct":
        return f"{value:.1f}"
    return _si(value)


def _si(value: float) -> str:
    """A rate in at most 5 characters: 950, 12.3k, 4.5M."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= div:
            return f"{value / div:.3g}{unit}"
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


# --- screen ---------------------------------------------------------------------------------
@dataclass
class State:
    """What the operator chose with keys: sort, filter, selection, drill-down."""
    sort: str = "exits/s"
    name_filter: str = ""
    selected: int = 0
    drill: str | None = None
    typing: bool = False           # reading a filter after '/'
    quit: bool = False

    def key(self, k: str, visible: list[str]) -> None:
        """Apply one key press (`visible` = VM names in screen order)."""
        if self.typing:
            self._filter_key(k)
        elif k in ("q", "Q"):
            self.quit = True
        elif k == "s":
            self.sort = SORT_KEYS[(SORT_KEYS.index(self.sort) + 1) % len(SORT_KEYS)]
        elif k == "/":
            self.typing, self.name_filter = True, ""
        elif k in ("\x1b[A", "k"):
            self.selected = max(0, self.selected - 1)
        elif k in ("\x1b[B", "j"):
            self.selected = min(max(0, len(visible) - 1), self.selected + 1)
        elif k in ("\r", "\n", "d") and visible and self.drill is None:
            self.drill = visible[min(self.selected, len(visible) - 1)]
        elif k in ("\x1b", "b", "\x7f"):
            self.drill = None

    def _filter_key(self, k: str) -> None:
        if k in ("\r", "\n"):
            self.typing = False
        elif k == "\x1b":
            self.typing, self.name_filter = False, ""
        elif k in ("\x7f", "\x08"):
            self.name_filter = self.name_filter[:-1]
        elif k.isprintable():
            self.name_filter += k
        self.selected = 0


@dataclass
class Frame:
    """Everything one screen shows, computed from two snapshots."""
    rows: list[VmRow]
    deltas: list[Delta]
    off: dict[str, str]
    interval_s: float
    stamp: str


def make_frame(prev: dict[tuple, Metric], snapshot, limits: Thresholds) -> tuple[Frame, dict]:
    cur = series(snapshot.metrics())
    ds = deltas(prev, cur, snapshot.interval_s)
    return Frame(vm_rows(ds, limits), ds, dict(getattr(snapshot, "off", {})), snapshot.interval_s,
                 time.strftime("%H:%M:%S")), cur


def vm_table(frame: Frame, state: State, height: int) -> tuple[Table, list[str]]:
    rows = sort_rows(frame.rows, state.sort, state.name_filter)
    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, expand=False, show_edge=False)
    table.add_column("VM", width=11, no_wrap=True, overflow="ellipsis",
                     header_style="reverse" if state.sort == "name" else "bold")
    for col in COLUMNS[:1]:
        table.add_column(col.header, width=col.width, justify="right", no_wrap=True,
                         header_style="reverse" if state.sort == col.header else "bold")
    table.add_column(REASONS.header, width=REASONS.width, no_wrap=True, overflow="ellipsis")
    for col in COLUMNS[1:]:
        table.add_column(col.header, width=col.width, justify="right", no_wrap=True,
                         header_style="reverse" if state.sort == col.header else "bold")
    state.selected = min(state.selected, max(0, len(rows) - 1))
    for i, row in enumerate(rows[:height]):
        style = "bold red" if row.alerts else ""
        if i == state.selected:
            style += " reverse"
        reasons = ",".join(f"{r}" for r, rate in row.reasons[:2] if rate > 0) or "-"
        table.add_row(("!" if row.alerts else " ") + row.vm,
                      cell(COLUMNS[0], row.values[COLUMNS[0].header]), reasons,
                      *(cell(c, row.values[c.header]) for c in COLUMNS[1:]), style=style.strip())
    return table, [r.vm for r in rows]


def drill_table(frame: Frame, vm: str, height: int) -> Table:
    """Every series of one VM in this interval, busiest first within each family."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("metric", width=24, no_wrap=True, overflow="ellipsis")
    table.add_column("labels", width=32, no_wrap=True, overflow="ellipsis")
    table.add_column("value", width=12, justify="right", no_wrap=True)
    mine = [d for d in frame.deltas if d.metric.labels.get("vm") == vm]
    mine.sort(key=lambda d: (d.rate == 0, d.metric.name, -d.rate))
    for d in mine[:height]:
        labels = " ".join(f"{k}={v}" for k, v in sorted(d.metric.labels.items()) if k != "vm")
        if d.hist is not None:
            p99 = d.hist.percentiles((99.0,)).get("p99")
            value = f"p99 {fmt_ns(p99 * d.metric.scale * 1e9)}" if p99 is not None else "-"
        elif d.metric.kind == "counter":
            value = f"{_si(d.rate)}/s"
        else:
            value = f"{d.rate:.4g}"
        table.add_row(d.metric.name.removeprefix("kvmbpf_"), labels or "-", value)
    return table


def screen(frame: Frame | None, state: State, width: int, height: int) -> tuple[Group, list[str]]:
    """The whole screen for a terminal of width x height."""
    if frame is None:
        return Group(Text("kvmbpf top: collecting the first interval..."),
                     Text("q quit", style="dim")), []
    off_lines = [Text(f"off: {name}: {why}", style="yellow", no_wrap=True, overflow="ellipsis")
                 for name, why in frame.off.items()][:3]
    body_height = max(3, height - 5 - len(off_lines))
    alerts = sum(1 for r in frame.rows if r.alerts)
    title = (f"kvmbpf top {frame.stamp}  {len(frame.rows)} VM(s)  {frame.interval_s:.1f}s  "
             f"sort:{state.sort}" + (f"  filter:{state.name_filter}" if state.name_filter or state.typing else "")
             + (f"  {alerts} flagged" if alerts else ""))
    if state.drill:
        body, visible = drill_table(frame, state.drill, body_height - 1), []
        head = Text(f"{state.drill}: every series this interval (esc/b back)", style="bold")
        body = Group(head, body)
    else:
        body, visible = vm_table(frame, state, body_height)
    flagged = [f"{r.vm}: {', '.join(r.alerts)}" for r in frame.rows if r.alerts][:1]
    keys = ("filter: type a name, enter to apply, esc to clear" if state.typing else
            "q quit  s sort  / filter  up/down select  enter drill  esc back")
    parts = [Text(title, style="bold", no_wrap=True, overflow="ellipsis"), body, *off_lines]
    parts += [Text("! " + f, style="red", no_wrap=True, overflow="ellipsis") for f in flagged]
    parts.append(Text(keys, style="dim", no_wrap=True, overflow="ellipsis"))
    return Group(*parts), visible


# --- the loop -------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop()


def _read_key(fd: int, timeout: float) -> str | None:
    """One key press (an escape sequence as one key) or None after `timeout` seconds."""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return None
    data = os.read(fd, 16).decode(errors="replace")
    return data or None


def run_live(collector, interval: float, limits: Thresholds, state: State,
             count: int | None = None, duration: float | None = None,
             console: Console | None = None) -> int:
    """Refresh every `interval` s until q, Ctrl-C, SIGTERM, `count` frames or `duration`.

    Always detaches every probe (collector.close()) and restores the terminal.
    """
    from rich.live import Live  # noqa: PLC0415
    console = console or Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    old_term = signal.signal(signal.SIGTERM, _stop)
    frames, prev, frame = 0, {}, None
    start = time.monotonic()
    try:
        if fd is not None:
            tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False, transient=False) as live:
            def draw() -> list[str]:
                size = console.size
                group, shown = screen(frame, state, size.width, size.height)
                live.update(group, refresh=True)
                return shown
            visible = draw()
            deadline = start + interval
            while not state.quit:
                if (count is not None and frames >= count) or (
                        duration is not None and time.monotonic() - start >= duration):
                    break
                key = _read_key(fd, deadline - time.monotonic()) if fd is not None else \
                    time.sleep(max(0.0, deadline - time.monotonic()))
                if key:
                    state.key(key, visible)
                if time.monotonic() >= deadline:
                    frame, prev = make_frame(prev, collector.snapshot(), limits)
                    frames += 1
                    deadline += interval
                visible = draw()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        collector.close()
    return frames
