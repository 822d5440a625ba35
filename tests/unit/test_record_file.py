"""Recordings: write/read round trip, truncated and corrupt files, summaries, diffs, live deltas."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import pytest

from kvmbpf import record as rec
from kvmbpf.errors import KvmbpfError
from kvmbpf.hist import Histogram, slot_of
from kvmbpf.render import live
from kvmbpf.snapshot import Metric, TableData


@dataclass
class FakeSnapshot:
    """A fixture Snapshot (the protocol every collector's Snapshot follows)."""
    interval_s: float
    time: float
    exits: int
    lat_ns: list[int]
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        return f"{self.exits} exits"

    def tables(self, top: int) -> list[TableData]:
        return []

    def metrics(self) -> list[Metric]:
        return self._metrics


def _hist(values: list[int]) -> Histogram:
    h = Histogram()
    for v in values:
        h.add(slot_of(v), 1)
    return h


def _snapshots(per_interval: int, latency_ns: int, n: int, t0: float = 1000.0) -> list[FakeSnapshot]:
    """n one-second intervals of `per_interval` exits with latency `latency_ns` (cumulative metrics)."""
    out = []
    for i in range(1, n + 1):
        metrics = [Metric("kvmbpf_exits_total", "counter", "", {"vm": 'v"1', "reason": "IO"},
                          per_interval * i),
                   Metric("kvmbpf_lat_seconds", "histogram", "", {"vm": 'v"1'},
                          hist=_hist([latency_ns] * (10 * i)), scale=1e-9),
                   Metric("kvmbpf_probes", "gauge", "", {"collector": "x"}, 4)]
        out.append(FakeSnapshot(1.0, t0 + i, per_interval, [latency_ns], metrics))
    return out


def _write(path, snapshots) -> None:
    with open(path, "w") as out:
        recorder = rec.Recorder(out, ["fake"], {"net": "needs net:netif_receive_skb"})
        for snap in snapshots:
            recorder.add(snap)


def test_round_trip(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(path, _snapshots(100, 2000, 3))
    r = rec.load(str(path))
    assert r.header["collectors"] == ["fake"] and r.header["off"]["net"].startswith("needs")
    assert len(r.intervals) == 3 and r.duration_s == 3.0 and not r.truncated
    assert r.intervals[0].snapshot["exits"] == 100          # the Snapshot's plain JSON
    final = r.final()
    hist = next(m for m in final.values() if m.hist is not None)
    assert hist.hist.count == 30 and hist.labels == {"vm": 'v"1'}


def test_summary_rates_and_percentiles(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(path, _snapshots(100, 2000, 4))
    by_name = {s.name: s for s in rec.summarize(rec.load(str(path)))}
    assert by_name["kvmbpf_exits_total"].total == 400
    assert by_name["kvmbpf_exits_total"].rate == pytest.approx(100.0)
    assert by_name["kvmbpf_probes"].total == 4              # gauge: mean
    p99 = by_name["kvmbpf_lat_seconds"].percentiles["p99"]
    assert p99 == pytest.approx(2000e-9, rel=0.07)


def test_diff_before_after(tmp_path):
    before, after = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(before, _snapshots(100, 2000, 3))
    _write(after, _snapshots(50, 8000, 3))
    diffs = {(d.name, d.what): d for d in rec.diff(rec.load(str(before)), rec.load(str(after)))}
    rate = diffs[("kvmbpf_exits_total", "rate/s")]
    assert rate.before == pytest.approx(100) and rate.after == pytest.approx(50)
    assert rate.change_pct == pytest.approx(-50)
    p99 = diffs[("kvmbpf_lat_seconds", "p99")]
    assert p99.after / p99.before == pytest.approx(4, rel=0.1)


def test_truncated_last_line_is_ignored(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(path, _snapshots(100, 2000, 2))
    with open(path, "a") as out:
        out.write('{"time": 5, "interval_s": 1, "metr')     # writer killed mid-line
    r = rec.load(str(path))
    assert r.truncated and len(r.intervals) == 2


@pytest.mark.parametrize("content, message", [
    (b"", "empty or no header"),
    (b'{"something": 1}\n', "not a kvmbpf recording"),
    (b"\xff\xfe\x00garbage\n", "not UTF-8"),
    (b'{"kvmbpf_recording": 1}\n{not json}\n{"time": 1}\n', ":2: corrupt recording line"),
    (b'{"kvmbpf_recording": 1}\n{"time": 1}\n', ":2: corrupt recording line"),
])
def test_corrupt_input_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(KvmbpfError) as err:
        rec.load(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_file_is_one_line_error(tmp_path):
    with pytest.raises(KvmbpfError, match="cannot read recording"):
        rec.load(str(tmp_path / "missing.jsonl"))


def test_recorder_writes_whole_flushed_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    with open(path, "w") as out:
        recorder = rec.Recorder(out, ["fake"], {})
        recorder.add(_snapshots(1, 100, 1)[0])
        # flushed per interval: another reader sees both lines before the file is closed
        with open(path) as reader:
            lines = reader.read().split("\n")
        assert len(lines) == 3 and lines[-1] == ""
        assert json.loads(lines[1])["interval_s"] == 1.0


def test_interval_histograms_are_deltas(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(path, _snapshots(100, 2000, 3))
    rows = rec.interval_histograms(rec.load(str(path)), "kvmbpf_lat_seconds")
    assert [h.count for _, h, _ in rows] == [10, 10, 10]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is a dependency of report --plot")
    path, png = tmp_path / "r.jsonl", tmp_path / "p.png"
    _write(path, _snapshots(100, 2000, 3))
    assert rec.plot(rec.load(str(path)), str(png)) == ["kvmbpf_lat_seconds"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_rows_rates_reasons_and_alerts():
    limits = live.Thresholds(exit_rate=150, steal_pct=10)
    prev, frames = {}, []
    for snap in _snapshots(200, 2000, 2):
        frame, prev = live.make_frame(prev, snap, limits)
        frames.append(frame)
    row = frames[-1].rows[0]
    assert row.vm == 'v"1'
    assert row.values["exits/s"] == pytest.approx(200)
    assert row.reasons == [("IO", pytest.approx(200))]
    assert row.alerts == ["IO 200/s"]
    assert row.values["steal%"] is None                   # no steal collector in this fixture


def test_live_steal_pct_and_sort_filter():
    steal = [Metric("kvmbpf_steal_wait_seconds_total", "counter", "", {"vm": vm, "vcpu": "0"}, s)
             for vm, s in (("a", 0.5), ("b", 0.05))]
    ds = live.deltas({}, rec.series(steal), 1.0)
    rows = live.vm_rows(ds, live.Thresholds(steal_pct=10))
    assert {r.vm: r.values["steal%"] for r in rows} == {"a": pytest.approx(50), "b": pytest.approx(5)}
    assert [r.alerts for r in rows] == [["steal 50%"], []]
    assert [r.vm for r in live.sort_rows(rows, "steal%", "")] == ["a", "b"]
    assert [r.vm for r in live.sort_rows(rows, "steal%", "B")] == ["b"]


def test_live_keys():
    state = live.State()
    state.key("s", ["a", "b"])
    assert state.sort == live.SORT_KEYS[(live.SORT_KEYS.index("exits/s") + 1) % len(live.SORT_KEYS)]
    state.key("\x1b[B", ["a", "b"])
    state.key("\r", ["a", "b"])
    assert state.drill == "b"
    state.key("\x1b", ["a", "b"])
    assert state.drill is None
    for k in "/ab\x7fc\r":
        state.key(k, ["a", "b"])
    assert state.name_filter == "ac" and not state.typing
    state.key("q", [])
    assert state.quit


def test_live_screen_fits_80x24():
    from rich.console import Console
    prev = {}
    for snap in _snapshots(20000, 2000, 2):
        frame, prev = live.make_frame(prev, snap, live.Thresholds())
    frame.off = {"net": "needs net:netif_receive_skb " * 5}
    console = Console(file=io.StringIO(), width=80, height=24, force_terminal=False)
    group, visible = live.screen(frame, live.State(), 80, 24)
    console.print(group)
    lines = console.file.getvalue().splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
    assert visible == ['v"1'] and any("off: net" in line for line in lines)
    assert any(line.startswith('!v"1') for line in lines)     # flagged: 20,000 IO exits/s


def test_recording_files_need_no_root(tmp_path):
    path = tmp_path / "r.jsonl"
    _write(path, _snapshots(1, 100, 1))
    os.chmod(path, 0o444)
    assert rec.load(str(path)).intervals
