"""What a `kvmbpf qemu trace` uprobe costs per hit, measured on a vCPU thread in an MMIO storm.

The lab's exits guest writes an unassigned MMIO address in a loop (MMIO_COUNT per
round, no delay): one userspace exit and one memory_region_dispatch_write call in
QEMU's vCPU thread per write, plus one per marker byte on COM1.  The cost is the
vCPU thread's CPU time (schedstat: run-queue waits on this shared host do not
count) per dispatched write over whole rounds (guest 'end' markers), untraced,
with the uprobe (kvmbpf qemu trace) and with uprobe + uretprobe (--latency).
Configurations alternate in short windows; ratios use medians.

    .venv/bin/python benchmarks/qemu_bench.py [--window 2] [--reps 5]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

from kvmbpf import inventory
from kvmbpf.collectors.base import Scope
from kvmbpf.collectors.qemu import QemuCollector
from kvmbpf.lab.lab import Lab

MMIO_COUNT = 5000
PER_ROUND = MMIO_COUNT + len("KVMBPF:begin\n") + len("KVMBPF:end\n")
FUNC = "memory_region_dispatch_write"


@contextlib.contextmanager
def traced(pid: int, latency: bool):
    collector = QemuCollector(Scope(pids=(pid,)), (FUNC,), latency=latency, force=True)
    try:
        yield
    finally:
        collector.snapshot()
        collector.close()


CONFIGS = {
    "untraced": lambda pid: contextlib.nullcontext(),
    "uprobe (qemu trace)": lambda pid: traced(pid, False),
    "uprobe+uretprobe (--latency)": lambda pid: traced(pid, True),
}


def round_end(vm, tid: int) -> tuple[int, int]:
    """(rounds ended, vCPU CPU ns) just after the guest's next 'end' marker."""
    seen = vm.markers().count("end")
    while (now := vm.markers().count("end")) == seen:
        time.sleep(0.0005)
    return now, int(Path(f"/proc/{vm.pid}/task/{tid}/schedstat").read_text().split()[0])


def ns_per_write(vm, tid: int, window: float) -> float:
    rounds0, cpu0 = round_end(vm, tid)
    time.sleep(window)
    rounds1, cpu1 = round_end(vm, tid)
    return (cpu1 - cpu0) / ((rounds1 - rounds0) * PER_ROUND)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--reps", type=int, default=5, help="rounds over all configurations")
    args = ap.parse_args()
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with Lab("bqemu") as lab:
        vm = lab.start_vm("bench-qemu", "exits", {"MMIO_COUNT": MMIO_COUNT, "ROUNDS": 0})
        vm.wait_for("end", 3)
        tid = next(t.tid for t in inventory.scan().by_pid()[vm.pid].vcpus)
        for _ in range(args.reps):
            for name, config in CONFIGS.items():
                with config(vm.pid):
                    time.sleep(0.3)
                    results[name].append(ns_per_write(vm, tid, args.window))
    med = {name: statistics.median(samples) for name, samples in results.items()}
    base = med["untraced"]
    print(f"{'configuration':<30}{'ns/write':>9}{'vs untraced':>13}{'+ns/hit':>9}  min..max")
    for name, samples in results.items():
        print(f"{name:<30}{med[name]:>9.0f}{med[name] / base:>13.3f}{med[name] - base:>+9.0f}"
              f"  {min(samples):.0f}..{max(samples):.0f}")


if __name__ == "__main__":
    main()
