"""`kvmbpf record` (interval snapshots to a file) and `kvmbpf report` (summaries, diffs, plots)."""
from __future__ import annotations

import dataclasses
import json

import click

from .. import record as rec
from ..cli import console, main, tracing_options
from ..collectors.base import Scope
from ..collectors.multi import MultiCollector
from ..errors import KvmbpfError
from ..render.jsonl import write_snapshot
from ..render.table import render_tables
from ..session import Timing, run
from ..snapshot import TableData, fmt_ns
from .top import collectors_option


@main.command("record")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Recording file (JSON lines; overwritten).")
@collectors_option
@tracing_options
def record_cmd(output: str, collectors: tuple[str, ...], vms, pids, vcpus, timing: Timing,
               as_json: bool, top: int) -> None:
    """Record every running collector's interval snapshots to a file (default interval 1 s).

    Each interval is one JSON line, flushed when written; Ctrl-C or SIGTERM
    ends the recording with a valid file holding every interval so far.
    """
    if timing.interval is None:
        timing = dataclasses.replace(timing, interval=1.0)
    try:
        out = open(output, "w", encoding="utf-8")
    except OSError as exc:
        raise KvmbpfError(f"cannot write {output}: {exc.strerror}") from None
    with out:
        multi = MultiCollector(Scope(vms, pids, vcpus), collectors)
        recorder = rec.Recorder(out, list(multi.collectors), multi.off)

        def emit(snapshot) -> None:
            recorder.add(snapshot)
            if as_json:
                write_snapshot(snapshot)
            else:
                console.print(f"[dim]{len(multi.collectors)} collector(s)[/dim] {snapshot.headline()}",
                              highlight=False)
        click.echo(f"kvmbpf record: writing {output}: {', '.join(multi.collectors)}"
                   + "".join(f"; {name} off: {why}" for name, why in multi.off.items())
                   + "; Ctrl-C to stop", err=True)
        run(multi, timing, emit)


@main.command()
@click.argument("recordings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw latency distributions over time to this PNG (one recording).")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True,
              help="Series per metric family.")
@click.option("--json", "as_json", is_flag=True, help="The summary or diff as JSON.")
def report(recordings: tuple[str, ...], plot_path: str | None, top: int, as_json: bool) -> None:
    """Summarize RECORDING, or compare BEFORE AFTER (e.g. around a tuning change). No root needed."""
    if len(recordings) > 2:
        raise KvmbpfError("report takes one recording, or two to compare (BEFORE AFTER)")
    loaded = [rec.load(path) for path in recordings]
    if plot_path:
        if len(loaded) != 1:
            raise KvmbpfError("--plot draws one recording")
        names = rec.plot(loaded[0], plot_path)
        console.print(f"wrote {plot_path}: {', '.join(names)}", highlight=False)
        return
    if len(loaded) == 1:
        _summary(loaded[0], top, as_json)
    else:
        _diff(loaded[0], loaded[1], top, as_json)


def _describe(r: rec.Recording) -> str:
    off = r.header.get("off") or {}
    return (f"{r.path}: {len(r.intervals)} interval(s), {r.duration_s:.1f}s on {r.header.get('host')} "
            f"({r.header.get('kernel')}); collectors {', '.join(r.header.get('collectors', []))}"
            + (f"; off: {', '.join(f'{k} ({v})' for k, v in off.items())}" if off else "")
            + ("; last line was cut short (ignored)" if r.truncated else ""))


def _labels(labels: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _value(what: str, v: float | None, scale: float) -> str:
    """Percentiles of second-scaled histograms as durations, anything else as a number."""
    if v is None:
        return "-"
    if (what.startswith("p") or what == "max") and scale != 1.0:
        return fmt_ns(v * 1e9)
    return _num(v)


def _num(v: float) -> str:
    """12,345 for large values, 3 significant digits for small ones."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _by_family(items: list, top: int) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items:
        group = out.setdefault(item.name, [])
        if len(group) < top:
            group.append(item)
    return out


def _summary(r: rec.Recording, top: int, as_json: bool) -> None:
    summary = rec.summarize(r)
    if as_json:
        click.echo(json.dumps({"recording": r.path, "intervals": len(r.intervals),
                               "duration_s": r.duration_s, "header": r.header,
                               "series": [dataclasses.asdict(s) for s in summary]}))
        return
    console.print(_describe(r), highlight=False)
    tables = []
    for name, rows in _by_family(summary, top).items():
        kind = rows[0].kind
        if kind == "histogram":
            cols = ["labels", "samples", "per s", "p50", "p99", "p99.9", "max"]
            cells = [[_labels(s.labels), int(s.total), _num(s.rate),
                      *(_value(k, s.percentiles.get(k), s.scale) for k in ("p50", "p99", "p99.9", "max"))]
                     for s in rows]
        elif kind == "gauge":
            cols, cells = ["labels", "mean"], [[_labels(s.labels), _num(s.total)] for s in rows]
        else:
            cols = ["labels", "total", "per s"]
            cells = [[_labels(s.labels), _num(s.total), _num(s.rate)] for s in rows]
        tables.append(TableData(f"{name} ({kind})", cols, cells))
    render_tables(console, f"summary over {r.duration_s:.1f}s", tables)


def _diff(before: rec.Recording, after: rec.Recording, top: int, as_json: bool) -> None:
    diffs = rec.diff(before, after)
    if as_json:
        click.echo(json.dumps({"before": before.path, "after": after.path,
                               "series": [dict(dataclasses.asdict(d), change_pct=d.change_pct)
                                          for d in diffs]}))
        return
    console.print("before: " + _describe(before), highlight=False)
    console.print("after:  " + _describe(after), highlight=False)
    ranked = sorted(diffs, key=lambda d: (d.name, -abs(d.change_pct or 0.0)
                                          if d.before is not None and d.after is not None else 1))
    tables = [TableData(name, ["labels", "what", "before", "after", "change"],
                        [[_labels(d.labels), d.what, _value(d.what, d.before, d.scale),
                          _value(d.what, d.after, d.scale),
                          f"{d.change_pct:+.1f}%" if d.change_pct is not None else
                          ("new" if d.before is None else "gone" if d.after is None else "-")]
                         for d in rows])
              for name, rows in _by_family(ranked, top * 3).items()]
    render_tables(console, "after vs before", tables)
