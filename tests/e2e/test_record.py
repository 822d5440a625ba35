"""`kvmbpf record` / `kvmbpf report` on real lab guests: signals leave valid files, numbers match
the guest's own round count, report BEFORE AFTER sees a known change, --plot draws, no root needed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, prog_ids_of, run_kvmbpf, tracing_prog_ids, unique
from kvmbpf import record as rec

ROUND = {"DELAY_MS": 100, "ROUNDS": 0}


def record_until(path, name: str, intervals: int, sig: int = signal.SIGTERM,
                 collectors: tuple[str, ...] = ("exits",)) -> tuple[int, set[int]]:
    """Run `kvmbpf record` until `intervals` lines are on disk, then send `sig`."""
    args = [sys.executable, "-m", "kvmbpf", "record", "-o", str(path), "--vm", name, "0.5"]
    for c in collectors:
        args += ["--collector", c]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline, ours = time.monotonic() + 60, set()
    while time.monotonic() < deadline and proc.poll() is None:
        ours |= prog_ids_of(proc.pid)
        if path.exists() and path.read_text().count("\n") >= intervals + 1:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return proc.returncode, ours


def pio_rate(summary: dict, name: str) -> float:
    return sum(s["rate"] for s in summary["series"] if s["name"] == "kvmbpf_pio_total"
               and s["labels"] == {"vm": name, "port": "0x700", "direction": "out"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_record_signal_leaves_valid_file_matching_guest(lab, tmp_path, sig):
    name = unique("rec")
    vm = lab.start_vm(name, "exits", {"PIO_COUNT": 1000, **ROUND})
    path = tmp_path / "run.jsonl"
    begins_before = vm.markers().count("begin")
    _, ours = record_until(path, name, 6, sig)
    begins_after = vm.markers().count("begin")
    assert ours and not (ours & tracing_prog_ids()), "record left its BPF programs loaded"
    text = path.read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    recording = rec.load(str(path))
    assert len(recording.intervals) >= 6 and not recording.truncated
    # ground truth: 1000 writes to port 0x700 per guest round
    res = run_kvmbpf("report", "--json", str(path))
    assert res.rc == 0, res.err
    summary = json.loads(res.out)
    total = pio_rate(summary, name) * summary["duration_s"]
    rounds = total / 1000
    assert begins_before - 1 <= rounds <= begins_after + 1, (rounds, begins_before, begins_after)
    # the human summary names the series
    human = run_kvmbpf("report", str(path))
    assert human.rc == 0 and "kvmbpf_pio_total" in human.out and "port=0x700" in human.out


def test_report_before_after_sees_the_change(lab, tmp_path):
    name = unique("diff")
    runs = {}
    for label, count in (("before", 300), ("after", 1500)):
        vm = lab.start_vm(name, "exits", {"PIO_COUNT": count, **ROUND})
        path = tmp_path / f"{label}.jsonl"
        begin0, t0 = vm.markers().count("begin"), time.monotonic()
        record_until(path, name, 6)
        begin1, t1 = vm.markers().count("begin"), time.monotonic()
        vm.stop()
        runs[label] = (path, count * (begin1 - begin0) / (t1 - t0))
    res = run_kvmbpf("report", "--json", str(runs["before"][0]), str(runs["after"][0]))
    assert res.rc == 0, res.err
    rows = [d for d in json.loads(res.out)["series"] if d["name"] == "kvmbpf_pio_total"
            and d["labels"].get("port") == "0x700" and d["what"] == "rate/s"]
    assert len(rows) == 1
    before, after = rows[0]["before"], rows[0]["after"]
    # each rate within 25 % of the guest's own (marker counting is coarse: a round is ~0.1 s)
    assert before == pytest.approx(runs["before"][1], rel=0.25)
    assert after == pytest.approx(runs["after"][1], rel=0.25)
    assert rows[0]["change_pct"] == pytest.approx(100 * (after - before) / before)
    human = run_kvmbpf("report", str(runs["before"][0]), str(runs["after"][0]))
    assert human.rc == 0 and "after vs before" in human.out and "%" in human.out


def test_report_plot_and_no_root(lab, tmp_path):
    name = unique("plot")
    lab.start_vm(name, "exits", {"PIO_COUNT": 500, **ROUND})
    path, png = tmp_path / "run.jsonl", tmp_path / "lat.png"
    record_until(path, name, 4, collectors=("exits", "steal"))
    res = run_kvmbpf("report", str(path), "--plot", str(png))
    assert res.rc == 0, res.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kvmbpf_vmm_time_seconds" in res.out and "kvmbpf_steal_wait_seconds" in res.out
    # report needs no root: read a world-readable copy as nobody
    if shutil.which("runuser") is None:
        pytest.skip("runuser is missing (util-linux)")
    public = "/tmp/" + unique("kvmbpf-rec") + ".jsonl"
    shutil.copy(path, public)
    os.chmod(public, 0o644)
    try:
        proc = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-m", "kvmbpf",
                               "report", public], cwd="/", capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp"})
    finally:
        os.unlink(public)
    assert proc.returncode == 0, proc.stderr
    assert "kvmbpf_pio_total" in proc.stdout


@pytest.mark.parametrize("content", [b"garbage\n", b'{"kvmbpf_recording": 1}\n{"time": 1\n{}\n'])
def test_report_corrupt_file_exit_2(tmp_path, content):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    res = run_kvmbpf("report", str(bad))
    assert res.rc == 2 and res.err.startswith("kvmbpf: error: ") and res.err.count("\n") == 1


def test_report_unreadable_and_bad_args_exit_2(tmp_path):
    res = run_kvmbpf("report", str(tmp_path / "missing.jsonl"))
    assert res.rc == 2 and "cannot read recording" in res.err and res.err.count("\n") == 1
    (tmp_path / "a").write_text('{"kvmbpf_recording": 1}\n')
    res = run_kvmbpf("report", str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "a"))
    assert res.rc == 2 and res.err.count("\n") == 1
    res = run_kvmbpf("record", "-o", str(tmp_path / "no-such-dir" / "x.jsonl"), "1", "1")
    assert res.rc == 2 and "cannot write" in res.err
