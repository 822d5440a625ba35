"""Cost of `kvmbpf steal` per context switch: a pipe ping-pong storm pinned to one CPU.

Two processes bounce one byte over two pipes (C, built with gcc into a temp dir), both
pinned to the same CPU, so every round trip is two sched_switch and two sched_wakeup
events of untraced tasks — the case the filter must make cheap.  Metric: CPU time of
both processes (schedstat field 1, so run-queue waits on this shared host do not count)
per context switch, in alternating windows per configuration, medians:
  untraced | floor (empty program on sched_switch) | filter (the two traced_tids
  lookups only) | kvmbpf steal (the real collector, tracing one lab VM).
Run as root: python benchmarks/steal_bench.py [--windows 5] [--seconds 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmbpf.collectors.base import Scope                      # noqa: E402
from kvmbpf.collectors.steal import StealCollector            # noqa: E402
from kvmbpf.lab.lab import Lab                                 # noqa: E402

PINGPONG = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <signal.h>
static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }
int main(void) {
    int a[2], b[2]; char c = 0; unsigned long n = 0;
    if (pipe(a) || pipe(b)) return 1;
    signal(SIGTERM, on_term);
    pid_t child = fork();
    if (child == 0) { for (;;) { if (read(a[0], &c, 1) != 1) return 0; write(b[1], &c, 1); } }
    printf("%d\n", child); fflush(stdout);
    while (!stop) { write(a[1], &c, 1); read(b[0], &c, 1); n++; }
    kill(child, SIGKILL);
    printf("%lu\n", n);
    return 0;
}
"""

FLOOR = "TRACEPOINT_PROBE(sched, sched_switch) { return 0; }"
FILTER = """
BPF_HASH(traced_tids, u32, u32, 16384);
TRACEPOINT_PROBE(sched, sched_switch) {
    u32 prev = args->prev_pid, next = args->next_pid;
    if (traced_tids.lookup(&prev)) return 1;
    if (traced_tids.lookup(&next)) return 2;
    return 0;
}
"""


def cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def window(binary: Path, cpu: int, seconds: float) -> float:
    """ns of CPU per context switch for one storm window."""
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    child = int(proc.stdout.readline())
    time.sleep(0.2)
    start = cpu_ns(proc.pid) + cpu_ns(child)
    time.sleep(seconds)
    used = cpu_ns(proc.pid) + cpu_ns(child) - start
    proc.terminate()
    rounds = int(proc.stdout.readline())
    proc.wait()
    # the parent's count covers its whole life; scale by time to the measured window
    return used / (rounds * seconds / (seconds + 0.2)) / 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    opts = parser.parse_args()
    import bcc
    cpu = max(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp, Lab("bench" + os.urandom(2).hex()) as lab:
        src = Path(tmp, "pingpong.c")
        src.write_text(PINGPONG)
        binary = Path(tmp, "pingpong")
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True)
        vm = lab.start_vm("steal-bench", "exits", {"ROUNDS": 1, "FINISH": 1})
        vm.wait_for("done")
        configs = {
            "untraced": lambda: None,
            "floor": lambda: bcc.BPF(text=FLOOR),
            "filter": lambda: bcc.BPF(text=FILTER),
            "kvmbpf steal": lambda: StealCollector(Scope(("steal-bench",))),
        }
        results: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(opts.windows):
            for name, make in configs.items():
                tracer = make()
                try:
                    results[name].append(window(binary, cpu, opts.seconds))
                finally:
                    if tracer is not None:
                        (tracer.cleanup if hasattr(tracer, "cleanup") else tracer.close)()
    base = statistics.median(results["untraced"])
    floor = statistics.median(results["floor"])
    print("| configuration | ns/switch (CPU) | vs untraced | added vs floor |")
    print("|---|---:|---:|---:|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med / base:.3f} | {med - floor:+.0f} ns |")


if __name__ == "__main__":
    main()
