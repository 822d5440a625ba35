"""What `kvmbpf blk` costs per block event, measured by the kernel itself.

fio (psync 4k randread) on a loop device over a /dev/shm file, with three tracers attached
to the same tracepoints at once, so every one of them runs for exactly the same events:
  empty      bpftrace programs with empty bodies on the eight tracepoints kvmbpf blk uses
  clock      bpftrace programs that only read the clock, on the three tracepoints every
             request passes (queue, issue, complete): the floor for two latencies
  bpftrace   a bpftrace queue -> complete latency histogram keyed like kvmbpf's (dev, sector)
  kvmbpf     kvmbpf blk --all --dev <loop>
With BPF run-time statistics on (BPF_ENABLE_STATS: held by an fd, so no global setting is
changed or left behind), the kernel sums each program's run time and run count; per
tracepoint we report ns per event, and per request the sum over the tracepoints a request
passes (each tracer's total run time / fio's requests).  Wall-clock throughput is not used:
on a shared host single fio runs varied 30x.  The kernel's own per-event work (tracepoint
record, program dispatch) is the same for every tracer and is not in these figures.
Run as root: .venv/bin/python benchmarks/blk_bench.py [seconds]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bpfstats  # noqa: E402  (benchmarks/, next to this file)

EVENTS = ("block_bio_queue", "block_bio_backmerge", "block_bio_frontmerge", "block_bio_remap",
          "block_rq_merge", "block_rq_issue", "block_rq_requeue", "block_rq_complete")
MODES = ("empty", "clock", "bpftrace", "kvmbpf")


def fio(device: str, seconds: float) -> int:
    out = subprocess.run(["fio", "--name=bench", f"--filename={device}", "--direct=1",
                          "--rw=randread", "--ioengine=psync", "--bs=4k", "--size=64M",
                          f"--runtime={seconds}", "--time_based", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["total_ios"]


PROGRAMS = {"empty": len(EVENTS), "clock": 3, "bpftrace": 2, "kvmbpf": len(EVENTS)}


def tracer_command(mode: str, device: str, dev: int) -> tuple[list[str], str]:
    if mode == "kvmbpf":
        return [sys.executable, "-m", "kvmbpf", "blk", "--all", "--dev", device, "--json", "1"], "{"
    if mode == "empty":
        script = ",".join(f"tracepoint:block:{e}" for e in EVENTS) + " { }"
    elif mode == "clock":    # the comparison keeps the read; it is never true
        script = ("tracepoint:block:block_bio_queue,tracepoint:block:block_rq_issue,"
                  "tracepoint:block:block_rq_complete { if (nsecs == 1) { @never = 1; } }")
    else:
        script = (f"tracepoint:block:block_bio_queue /args->dev == {dev}/ "
                  "{ @q[args->dev, args->sector] = nsecs; }\n"
                  "tracepoint:block:block_rq_complete { $t = @q[args->dev, args->sector]; "
                  "if ($t) { @lat = hist(nsecs - $t); delete(@q[args->dev, args->sector]); } }\n"
                  "END { clear(@q); clear(@lat); }")
    return ["bpftrace", "-e", script], "Attaching"


def start(mode: str, device: str, dev: int) -> tuple[subprocess.Popen, dict[int, str]]:
    """Start a tracer, wait until all its block programs are attached (bpftrace prints its
    banner before it attaches them)."""
    cmd, ready = tracer_command(mode, device, dev)
    return bpfstats.start_tracer(cmd, ready, PROGRAMS[mode])


def report(stats: dict[str, dict[str, bpfstats.Cost]], requests: int, seconds: float) -> None:
    """stats: mode -> tracepoint -> its programs' cost."""
    print(f"fio psync 4k randread, loop device over tmpfs, {seconds:g}s: {requests} requests; "
          "all tracers attached at once")
    print(f"{'tracepoint':22}" + "".join(f"{m + ' ns/ev':>16}" for m in MODES) + f"{'events':>10}")
    for event in EVENTS:
        cells = [stats[m].get(event) for m in MODES]
        if not any(c and c.runs for c in cells):
            continue
        runs = max(c.runs for c in cells if c)
        print(f"{event:22}" + "".join(f"{c.per_event:16.1f}" if c and c.runs else f"{'-':>16}"
                                      for c in cells) + f"{runs:10}")
    per_req = {m: sum(c.ns for c in stats[m].values()) / requests for m in MODES}
    print(f"{'per request (ns)':22}" + "".join(f"{per_req[m]:16.1f}" for m in MODES))
    for m in ("clock", "bpftrace", "kvmbpf"):
        print(f"{m} / empty = {per_req[m] / per_req['empty']:.2f}")
    print(f"kvmbpf / bpftrace = {per_req['kvmbpf'] / per_req['bpftrace']:.2f}")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10
    tracers: list[subprocess.Popen] = []
    with bpfstats.enabled(), tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="kvmbpf-blkbench-") as backing:
        backing.truncate(64 << 20)
        device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", backing.name],
                                capture_output=True, text=True, check=True).stdout.strip()
        try:
            st = os.stat(device)
            dev = (os.major(st.st_rdev) << 20) | os.minor(st.st_rdev)
            owned: dict[str, dict[int, str]] = {}
            for mode in MODES:
                proc, owned[mode] = start(mode, device, dev)
                tracers.append(proc)
            before = bpfstats.totals()
            requests = fio(device, seconds)
            after = bpfstats.totals()
        finally:
            for proc in tracers:
                bpfstats.stop_tracer(proc)
            subprocess.run(["losetup", "-d", device], check=False)
    stats = {m: bpfstats.per_event(before, after, progs) for m, progs in owned.items()}
    report(stats, requests, seconds)


if __name__ == "__main__":
    main()
