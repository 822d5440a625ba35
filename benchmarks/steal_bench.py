"""Cost of `kvmbpf steal` per scheduler event: a pipe ping-pong storm pinned to one CPU.

Two processes bounce one byte over two pipes (C, built with gcc into a temp dir), both
pinned to the same CPU, so every round trip is two sched_switch and two sched_wakeup
events of untraced tasks — the case the filter must make cheap.  Configurations, on the
four tracepoints kvmbpf steal attaches: floor (empty programs), filter (only the
traced_tids lookups kvmbpf steal starts with), kvmbpf steal (the real collector tracing one
spinning lab VM), and the peers runqlat-bpfcc and runqlat.bt (bpftrace).
Part 1: CPU time of both processes (schedstat field 1, so run-queue waits on this shared
host do not count) per context switch, in alternating windows per configuration, medians.
Part 2: every configuration attached at once for one storm; per tracepoint, each one's BPF
run time per event from the kernel's run-time statistics (benchmarks/bpfstats.py).
Run as root: python benchmarks/steal_bench.py [--windows 5] [--seconds 2] [--stats-seconds 10]
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

import bpfstats                                                # noqa: E402
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

EVENTS = ("sched_switch", "sched_wakeup", "sched_wakeup_new", "sched_migrate_task")
FLOOR = "\n".join(f"TRACEPOINT_PROBE(sched, {e}) {{ return 0; }}" for e in EVENTS)
FILTER = """
BPF_HASH(traced_tids, u32, u32, 16384);
TRACEPOINT_PROBE(sched, sched_switch) {
    u32 prev = args->prev_pid, next = args->next_pid;
    if (traced_tids.lookup(&prev)) return 1;
    if (traced_tids.lookup(&next)) return 2;
    return 0;
}
""" + "".join(f"""
TRACEPOINT_PROBE(sched, {e}) {{
    u32 tid = args->pid;
    return traced_tids.lookup(&tid) ? 1 : 0;
}}
""" for e in EVENTS[1:])
PEERS = {"runqlat-bpfcc": (["/usr/sbin/runqlat-bpfcc"], "Tracing", 3),
         "runqlat.bt": (["bpftrace", "/usr/sbin/runqlat.bt"], "Attaching", 3)}


class Peer:
    """A peer tool as a process: started, attached, stopped with SIGINT."""

    def __init__(self, name: str):
        cmd, ready, self.programs = PEERS[name]
        self.proc, self.attached = bpfstats.start_tracer(
            cmd, ready, self.programs, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def close(self) -> None:
        bpfstats.stop_tracer(self.proc)


def programs_of(tracer) -> dict[int, str]:
    """Program id -> tracepoint for a bcc object, a collector or a peer."""
    if isinstance(tracer, Peer):
        return tracer.attached
    return bpfstats.bcc_programs(getattr(getattr(tracer, "program", None), "bpf", tracer))


def close(tracer) -> None:
    (tracer.cleanup if hasattr(tracer, "cleanup") else tracer.close)()


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


def part1(configs: dict, binary: Path, cpu: int, windows: int, seconds: float) -> None:
    results: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(windows):
        for name, make in configs.items():
            tracer = make()
            try:
                results[name].append(window(binary, cpu, seconds))
            finally:
                if tracer is not None:
                    close(tracer)
    base = statistics.median(results["untraced"])
    floor = statistics.median(results["floor"])
    print(f"Part 1: CPU ns per context switch, median of {windows} windows of {seconds:g} s")
    print("| configuration | ns/switch (CPU) | vs untraced | added vs floor | windows |")
    print("|---|---:|---:|---:|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med / base:.3f} | {med - floor:+.0f} ns | "
              f"{' '.join(f'{v:.0f}' for v in values)} |")


def part2(configs: dict, binary: Path, cpu: int, seconds: float) -> None:
    """All tracers at once for one storm; per tracepoint and tracer, BPF ns per event."""
    names = [n for n in configs if n != "untraced"]
    with bpfstats.enabled():
        tracers: dict = {}
        try:
            for name in names:
                tracers[name] = configs[name]()
            progs = {name: programs_of(t) for name, t in tracers.items()}
            before = bpfstats.totals()
            per_switch = window(binary, cpu, seconds)
            after = bpfstats.totals()
        finally:
            for tracer in tracers.values():
                close(tracer)
    costs = {name: bpfstats.per_event(before, after, p) for name, p in progs.items()}
    print(f"\nPart 2: BPF run time per event (ns), all attached at once, {seconds:g} s storm "
          f"({per_switch:.0f} ns CPU per switch with all of them)")
    print("| tracepoint | events | " + " | ".join(names) + " | steal / filter |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for event in EVENTS:
        cells = [costs[n].get(event) for n in names]
        runs = max((c.runs for c in cells if c), default=0)
        shown = " | ".join(f"{c.per_event:.1f}" if c and c.runs else "-" for c in cells)
        steal, filt = costs["kvmbpf steal"][event], costs["filter"][event]
        ratio = f"{steal.per_event / filt.per_event:.2f}" if filt.runs else "-"
        print(f"| {event} | {runs} | {shown} | {ratio} |")
    totals = {n: sum(c.ns for c in costs[n].values()) for n in names}
    switches = max(costs[n]["sched_switch"].runs for n in names)
    print("| **all, ns per sched_switch** | " + f"{switches} | "
          + " | ".join(f"**{totals[n] / switches:.1f}**" for n in names)
          + f" | {totals['kvmbpf steal'] / totals['filter']:.2f} |")
    for peer in PEERS:
        print(f"kvmbpf steal / {peer} (all programs): {totals['kvmbpf steal'] / totals[peer]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--stats-seconds", type=float, default=10.0)
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
            **{peer: (lambda peer=peer: Peer(peer)) for peer in PEERS},
        }
        part1(configs, binary, cpu, opts.windows, opts.seconds)
        part2(configs, binary, cpu, opts.stats_seconds)


if __name__ == "__main__":
    main()
