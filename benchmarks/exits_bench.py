"""What `kvmbpf exits` costs a guest in an event storm, against an empty BPF program.

--workload pio: the lab's exits guest writes the in-kernel PIC's mask register (port 0x21)
in a loop: one kvm_pio per write, no userspace exit, so the event rate is bound by the exit
path.  --workload modeswitch: real <-> protected mode round trips (CR0_COUNT per round),
which a PVM host emulates instruction by instruction: 7 kvm_emulate_insn events per round
trip (the loop body), the hottest event kvmbpf exits attaches to.
The cost per event is the vCPU thread's CPU time (/proc/.../schedstat, so time spent
waiting for a CPU on this shared host does not count) over whole rounds, counted by the
guest's own serial markers (one 'end' per round): measured the same way untraced, with
an empty program on the workload's tracepoint (the floor any BPF tracer pays) and with the
full exits collector.  Configurations alternate in short windows to spread other load over
all of them; ratios use each configuration's median.

    .venv/bin/python benchmarks/exits_bench.py [--workload modeswitch] [--window 4] [--reps 3]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from kvmbpf import inventory
from kvmbpf.collectors.base import Scope
from kvmbpf.collectors.exits import ExitsCollector
from kvmbpf.lab.lab import Lab


@dataclass(frozen=True)
class Workload:
    params: dict[str, int]
    events_per_round: int
    tracepoint: str              # the floor: an empty program here


ROUND = 20_000
WORKLOADS = {
    "pio": Workload({"PIC_COUNT": ROUND, "ROUNDS": 0}, ROUND, "kvm_pio"),
    "modeswitch": Workload({"CR0_COUNT": ROUND, "ROUNDS": 0}, 7 * ROUND, "kvm_emulate_insn"),
}


@contextlib.contextmanager
def untraced(pid: int, workload: Workload):
    yield


@contextlib.contextmanager
def empty_program(pid: int, workload: Workload):
    from bcc import BPF
    bpf = BPF(text=f"TRACEPOINT_PROBE(kvm, {workload.tracepoint}) {{ return 0; }}")
    try:
        yield
    finally:
        bpf.cleanup()


@contextlib.contextmanager
def exits_collector(pid: int, workload: Workload):
    collector = ExitsCollector(Scope(pids=(pid,)))
    try:
        yield
    finally:
        collector.snapshot()          # the read path runs too, as in real use
        collector.close()


CONFIGS = {"untraced": untraced, "empty BPF": empty_program, "kvmbpf exits": exits_collector}


def next_round_end(vm, tid: int) -> tuple[int, int]:
    """(rounds ended, vCPU CPU ns) just after the guest's next 'end' marker."""
    seen = vm.markers().count("end")
    while (now := vm.markers().count("end")) == seen:
        time.sleep(0.0005)
    return now, int(Path(f"/proc/{vm.pid}/task/{tid}/schedstat").read_text().split()[0])


def ns_per_event(vm, tid: int, window: float, per_round: int) -> float:
    """vCPU CPU time per event over whole rounds lasting about `window` seconds."""
    rounds0, cpu0 = next_round_end(vm, tid)
    time.sleep(window)
    rounds1, cpu1 = next_round_end(vm, tid)
    return (cpu1 - cpu0) / ((rounds1 - rounds0) * per_round)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--reps", type=int, default=7, help="rounds over all configurations")
    ap.add_argument("--workload", choices=WORKLOADS, default="pio")
    args = ap.parse_args()
    workload = WORKLOADS[args.workload]
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with Lab("bexits") as lab:
        vm = lab.start_vm("bench-exits", "exits", workload.params)
        vm.wait_for("end", 3)
        tid = next(t.tid for t in inventory.scan().by_pid()[vm.pid].vcpus)
        for _ in range(args.reps):
            for name, config in CONFIGS.items():
                with config(vm.pid, workload):
                    time.sleep(0.5)             # settle after attach
                    results[name].append(ns_per_event(vm, tid, args.window, workload.events_per_round))
        lab.down()
    med = {name: statistics.median(samples) for name, samples in results.items()}
    base, floor = med["untraced"], med["empty BPF"]
    print(f"workload {args.workload}: floor = an empty BPF program on kvm:{workload.tracepoint}")
    print(f"{'configuration':<24}{'ns/event':>9}{'vs untraced':>13}{'vs floor':>10}  min..max")
    for name, samples in results.items():
        print(f"{name:<24}{med[name]:>9.0f}{med[name] / base:>13.3f}{med[name] / floor:>10.3f}"
              f"  {min(samples):.0f}..{max(samples):.0f}")
    print(f"kvmbpf exits over the floor: {med['kvmbpf exits'] - floor:+.0f} ns/event; "
          f"floor over untraced: {floor - base:+.0f} ns/event")


if __name__ == "__main__":
    main()
