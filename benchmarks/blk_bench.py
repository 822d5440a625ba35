"""What `kvmbpf blk` costs the I/O it watches: fio IOPS on a loop device over a tmpfs file.

Modes, interleaved over ROUNDS rounds in one run (median IOPS per mode, ratios to untraced):
  untraced   no probes
  empty      bpftrace programs with empty bodies on the eight tracepoints kvmbpf blk uses
  bpftrace   a bpftrace queue -> complete latency histogram keyed like kvmbpf's (dev, sector)
  kvmbpf     kvmbpf blk --all --dev <loop>
Run as root: .venv/bin/python benchmarks/blk_bench.py [seconds-per-run] [rounds]
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ("block_bio_queue", "block_bio_backmerge", "block_bio_frontmerge", "block_bio_remap",
          "block_rq_merge", "block_rq_issue", "block_rq_requeue", "block_rq_complete")


def fio_iops(device: str, seconds: float) -> float:
    out = subprocess.run(["fio", "--name=bench", f"--filename={device}", "--direct=1",
                          "--rw=randread", "--ioengine=psync", "--bs=4k", "--size=64M",
                          f"--runtime={seconds}", "--time_based", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


def bpftrace_script(mode: str, dev: int) -> str:
    if mode == "empty":
        return ",".join(f"tracepoint:block:{e}" for e in EVENTS) + " { }"
    return (f"tracepoint:block:block_bio_queue /args->dev == {dev}/ "
            "{ @q[args->dev, args->sector] = nsecs; }\n"
            "tracepoint:block:block_rq_complete { $t = @q[args->dev, args->sector]; "
            "if ($t) { @lat = hist(nsecs - $t); delete(@q[args->dev, args->sector]); } }\n"
            "END { clear(@q); clear(@lat); }")


def start_tracer(mode: str, device: str, dev: int) -> subprocess.Popen | None:
    """Start a tracer and wait until its probes are attached."""
    if mode == "untraced":
        return None
    if mode == "kvmbpf":
        cmd = [sys.executable, "-m", "kvmbpf", "blk", "--all", "--dev", device, "--json", "1"]
        ready = "{"
    else:
        cmd = ["bpftrace", "-e", bpftrace_script(mode, dev)]
        ready = "Attaching"
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        raise SystemExit(f"{mode}: tracer did not start ({line!r})")
    return proc


def stop_tracer(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    modes = ("untraced", "empty", "bpftrace", "kvmbpf")
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="kvmbpf-blkbench-") as backing:
        backing.truncate(64 << 20)
        device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", backing.name],
                                capture_output=True, text=True, check=True).stdout.strip()
        try:
            st = os.stat(device)
            dev = (os.major(st.st_rdev) << 20) | os.minor(st.st_rdev)
            results: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(rounds):
                for mode in modes:
                    tracer = start_tracer(mode, device, dev)
                    try:
                        results[mode].append(fio_iops(device, seconds))
                    finally:
                        stop_tracer(tracer)
                    time.sleep(0.5)
        finally:
            subprocess.run(["losetup", "-d", device], check=False)
    base = statistics.median(results["untraced"])
    print(f"fio psync 4k randread, loop device over tmpfs, {rounds} x {seconds:g}s per mode")
    print(f"{'mode':10} {'median IOPS':>12} {'ratio':>7}  runs")
    for mode in modes:
        med = statistics.median(results[mode])
        runs = " ".join(f"{v:.0f}" for v in results[mode])
        print(f"{mode:10} {med:12.0f} {med / base:7.3f}  {runs}")


if __name__ == "__main__":
    main()
