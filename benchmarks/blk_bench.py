"""What `kvmbpf blk` costs per block request.

fio (psync 4k randread) on a loop device over a /dev/shm file.

Part 1, the whole cost: the kernel's per-event tracepoint work (building the event record,
dispatching the program) is paid by every tracer, empty programs included, and is not in any
program's run time.  So each mode runs alone, right after an untraced run, and the host's
busy CPU time (/proc/stat: user, nice, system, irq, softirq; both CPUs) per fio request of
the two is compared: added ns per request, medians over the rounds.

Part 2, the programs alone, measured by the kernel itself: four tracers attached
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
Run as root: .venv/bin/python benchmarks/blk_bench.py [stats-seconds] [part1-seconds] [rounds]
"""
from __future__ import annotations

import json
import os
import statistics
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


def busy_ns() -> int:
    """CPU time the host spent busy, all CPUs (steal, idle and iowait left out)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) * 10**9 // os.sysconf("SC_CLK_TCK")


def busy_per_request(mode: str, device: str, dev: int, seconds: float) -> float:
    proc = None if mode == "untraced" else start(mode, device, dev)[0]
    try:
        before = busy_ns()
        requests = fio(device, seconds)
        return (busy_ns() - before) / requests
    finally:
        if proc:
            bpfstats.stop_tracer(proc)


def part1(device: str, dev: int, seconds: float, rounds: int) -> None:
    """Each round runs every mode right after an untraced run: added = the pair's difference,
    so drift of the host between rounds cancels; medians over rounds."""
    added: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            base = busy_per_request("untraced", device, dev, seconds)
            added[mode].append(busy_per_request(mode, device, dev, seconds) - base)
    med = {m: statistics.median(v) for m, v in added.items()}
    print(f"part 1: each mode alone after an untraced run, {rounds} rounds of {seconds:g}s: "
          "added busy CPU ns per request (median of the pairs' differences)")
    for m in MODES:
        print(f"{m:10}{med[m]:8.1f}   pairs: " + " ".join(f"{v:.0f}" for v in added[m]))
    for m in ("clock", "bpftrace", "kvmbpf"):
        print(f"added {m} / added empty = {med[m] / med['empty']:.2f}")
    print(f"added kvmbpf / added bpftrace = {med['kvmbpf'] / med['bpftrace']:.2f}")


def part2(device: str, dev: int, seconds: float) -> None:
    tracers: list[subprocess.Popen] = []
    with bpfstats.enabled():
        try:
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
    stats = {m: bpfstats.per_event(before, after, progs) for m, progs in owned.items()}
    report(stats, requests, seconds)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10
    part1_seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="kvmbpf-blkbench-") as backing:
        backing.truncate(64 << 20)
        device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", backing.name],
                                capture_output=True, text=True, check=True).stdout.strip()
        try:
            st = os.stat(device)
            dev = (os.major(st.st_rdev) << 20) | os.minor(st.st_rdev)
            if rounds:
                part1(device, dev, part1_seconds, rounds)
            part2(device, dev, seconds)
        finally:
            subprocess.run(["losetup", "-d", device], check=False)


if __name__ == "__main__":
    main()
