"""What `kvmbpf net` costs the traffic it watches: frames written into a tap on a bridge.

One lab network namespace with a bridge and a tap; a writer opens the tap (TUNSETIFF) and
writes 128-byte frames to the bridge's address as fast as it can (each is received by the tap,
passed up by the bridge and dropped as UNHANDLED_PROTO: every kvmbpf net probe but the
transmit ones runs per frame).  Modes:
  untraced   no probes
  empty      bpftrace programs with empty bodies on the five tracepoints kvmbpf net uses
  kvmbpf     kvmbpf net --dev <tap> --dev <bridge>
Part 1, modes interleaved over ROUNDS rounds, medians: the writer's CPU time per frame (the
receive path runs in its write() as softirq work, charged to it: this kernel has no
IRQ_TIME_ACCOUNTING) and frames/s.  Part 2: empty and kvmbpf attached at once for one run;
per tracepoint each one's BPF run time per event from the kernel's run-time statistics
(benchmarks/bpfstats.py), and per frame.
Run as root: .venv/bin/python benchmarks/net_bench.py [seconds-per-run] [rounds] [stats-seconds]
"""
from __future__ import annotations

import fcntl
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bpfstats  # noqa: E402  (benchmarks/, next to this file)
from kvmbpf.lab.lab import Lab  # noqa: E402
from kvmbpf.lab.network import IFF_NO_PI, IFF_TAP, TUNSETIFF, ether_frame  # noqa: E402

TRACEPOINTS = ("net:netif_receive_skb", "net:net_dev_queue", "net:net_dev_xmit",
               "skb:kfree_skb", "skb:consume_skb")
FRAME_SIZE = 128


def write_frames(tap: str, seconds: float, frame_hex: str) -> None:
    """Inside the namespace: write frames into the tap for `seconds`; print frames/s, CPU ns per
    frame and frames."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI).ljust(40, b"\0"))
    time.sleep(1.0)
    frame, sent = bytes.fromhex(frame_hex), 0
    start, cpu0 = time.monotonic(), time.process_time_ns()
    deadline = start + seconds
    while time.monotonic() < deadline:
        for _ in range(256):
            os.write(fd, frame)
        sent += 256
    print(sent / (time.monotonic() - start), (time.process_time_ns() - cpu0) / sent, sent)


def start_tracer(mode: str, tap: str, bridge: str) -> subprocess.Popen | None:
    """Start a tracer and return once all its probes are attached."""
    if mode == "untraced":
        return None
    if mode == "kvmbpf":
        cmd, ready = [sys.executable, "-m", "kvmbpf", "net", "1", "--json", "--dev", tap, "--dev", bridge], "{"
    else:
        cmd, ready = ["bpftrace", "-e", ",".join(f"tracepoint:{tp}" for tp in TRACEPOINTS) + " { }"], "Attaching"
    return bpfstats.start_tracer(cmd, ready, len(TRACEPOINTS))[0]


def stop_tracer(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        bpfstats.stop_tracer(proc)


def write(net, tap: str, seconds: float) -> tuple[float, float, int]:
    """(frames/s, writer CPU ns per frame, frames) of one writer run."""
    frame = ether_frame(net.mac(net.bridge), "02:00:00:00:00:01", 0x88B5, FRAME_SIZE)
    out = net._ns(sys.executable, __file__, "--write", tap, str(seconds), frame.hex())
    rate, cpu, frames = out.split()
    return float(rate), float(cpu), int(frames)


def run(net, tap: str, mode: str, seconds: float) -> tuple[float, float, int]:
    tracer = start_tracer(mode, tap, net.bridge)
    try:
        return write(net, tap, seconds)
    finally:
        stop_tracer(tracer)


def part1(net, tap: str, seconds: float, rounds: int) -> float:
    """Prints the table; returns the floor: ns per frame empty programs add over untraced."""
    modes = ("untraced", "empty", "kvmbpf")
    runs: dict[str, list[tuple[float, float, int]]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            runs[mode].append(run(net, tap, mode, seconds))
    med = {m: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
           for m, v in runs.items()}
    base, floor = med["untraced"][1], med["empty"][1]
    print(f"Part 1: median of {rounds} runs of {seconds:g} s per mode, interleaved")
    print("| mode | frames/s | writer CPU ns/frame | added ns/frame | added / floor's | CPU ns per run |")
    print("|---|---:|---:|---:|---:|---|")
    for mode in modes:
        rate, cpu = med[mode]
        print(f"| {mode} | {rate:,.0f} | {cpu:.0f} | {cpu - base:+.0f} | {(cpu - base) / (floor - base) if floor > base else float('nan'):.2f} | "
              f"{' '.join(f'{r[1]:.0f}' for r in runs[mode])} |")
    return floor - base


def part2(net, tap: str, seconds: float, floor: float) -> None:
    """empty and kvmbpf at once: BPF ns per event per tracepoint, and per frame."""
    with bpfstats.enabled():
        procs = {mode: start_tracer(mode, tap, net.bridge) for mode in ("empty", "kvmbpf")}
        try:
            progs = {mode: bpfstats.attached_by(p.pid) for mode, p in procs.items()}
            before = bpfstats.totals()
            _, _, frames = write(net, tap, seconds)
            after = bpfstats.totals()
        finally:
            for proc in procs.values():
                stop_tracer(proc)
    costs = {mode: bpfstats.per_event(before, after, p) for mode, p in progs.items()}
    print(f"\nPart 2: BPF run time per event (ns), both attached at once; {frames} frames written")
    print("| tracepoint | events | empty | kvmbpf | kvmbpf / empty |")
    print("|---|---:|---:|---:|---:|")
    for tp in TRACEPOINTS:
        event = tp.split(":")[1]
        e, k = costs["empty"].get(event), costs["kvmbpf"].get(event)
        if not e or not e.runs:
            continue
        print(f"| {event} | {e.runs} | {e.per_event:.1f} | {k.per_event:.1f} | {k.per_event / e.per_event:.2f} |")
    per_frame = {m: sum(c.ns for c in costs[m].values()) / frames for m in costs}
    print(f"| **per frame written** | {frames} | **{per_frame['empty']:.1f}** | **{per_frame['kvmbpf']:.1f}** | "
          f"**{per_frame['kvmbpf'] / per_frame['empty']:.2f}** |")
    added = floor + per_frame["kvmbpf"] - per_frame["empty"]
    print(f"kvmbpf per frame: floor {floor:.0f} ns (part 1: empty programs over untraced) + "
          f"{per_frame['kvmbpf'] - per_frame['empty']:.0f} ns (programs) = {added:.0f} ns = "
          f"{added / floor:.2f} x the empty programs (target <= 1.5)")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    stats_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    with Lab("nb" + os.urandom(2).hex()) as lab:
        net = lab.network()
        tap = net.add_tap("tapnbench")
        floor = part1(net, tap, seconds, rounds)
        part2(net, tap, stats_seconds, floor)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_frames(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        main()
