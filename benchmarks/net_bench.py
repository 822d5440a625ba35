"""What `kvmbpf net` costs the traffic it watches: frames/s written into a tap on a bridge.

One lab network namespace with a bridge and a tap; a writer opens the tap (TUNSETIFF) and
writes 128-byte frames to the bridge's address as fast as it can (each is received by the tap,
passed up by the bridge and dropped as UNHANDLED_PROTO: every kvmbpf net probe but the
transmit ones runs per frame).  Modes, interleaved over ROUNDS rounds (median frames/s):
  untraced   no probes
  empty      bpftrace programs with empty bodies on the five tracepoints kvmbpf net uses
  kvmbpf     kvmbpf net --dev <tap> --dev <bridge>
Run as root: .venv/bin/python benchmarks/net_bench.py [seconds-per-run] [rounds]
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

from kvmbpf.lab.lab import Lab  # noqa: E402
from kvmbpf.lab.network import IFF_NO_PI, IFF_TAP, TUNSETIFF, ether_frame  # noqa: E402

TRACEPOINTS = ("net:netif_receive_skb", "net:net_dev_queue", "net:net_dev_xmit",
               "skb:kfree_skb", "skb:consume_skb")
FRAME_SIZE = 128


def write_frames(tap: str, seconds: float, frame_hex: str) -> None:
    """Inside the namespace: write frames into the tap for `seconds`; print frames/s."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI).ljust(40, b"\0"))
    time.sleep(1.0)
    frame, sent = bytes.fromhex(frame_hex), 0
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        for _ in range(256):
            os.write(fd, frame)
        sent += 256
    print(sent / (time.monotonic() - start))


def start_tracer(mode: str, tap: str, bridge: str) -> subprocess.Popen | None:
    """Start a tracer and return once its probes are attached."""
    if mode == "untraced":
        return None
    if mode == "kvmbpf":
        cmd, ready = [sys.executable, "-m", "kvmbpf", "net", "1", "--json", "--dev", tap, "--dev", bridge], "{"
    else:
        cmd, ready = ["bpftrace", "-e", ",".join(f"tracepoint:{tp}" for tp in TRACEPOINTS) + " { }"], "Attaching"
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        raise SystemExit(f"{mode}: tracer did not start ({line!r})")
    return proc


def run(net, tap: str, mode: str, seconds: float) -> float:
    frame = ether_frame(net.mac(net.bridge), "02:00:00:00:00:01", 0x88B5, FRAME_SIZE)
    tracer = start_tracer(mode, tap, net.bridge)
    try:
        out = net._ns(sys.executable, __file__, "--write", tap, str(seconds), frame.hex())
        return float(out.strip())
    finally:
        if tracer is not None:
            tracer.terminate()
            tracer.wait(timeout=30)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    modes = ("untraced", "empty", "kvmbpf")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    with Lab("nbench") as lab:
        net = lab.network()
        tap = net.add_tap("tapnbench")
        for _ in range(rounds):
            for mode in modes:
                rates[mode].append(run(net, tap, mode, seconds))
    base = statistics.median(rates["untraced"])
    floor = statistics.median(rates["empty"])
    print(f"| mode | frames/s (median of {rounds}) | vs untraced | vs empty |")
    print("|---|---:|---:|---:|")
    for mode in modes:
        med = statistics.median(rates[mode])
        print(f"| {mode} | {med:,.0f} | {med / base:.3f} | {med / floor:.3f} |")
    print("per-round:", {m: [round(r) for r in v] for m, v in rates.items()})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_frames(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        main()
