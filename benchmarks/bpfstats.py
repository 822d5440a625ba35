"""Per-program run time measured by the kernel (BPF run-time statistics), for the benchmarks.

While an fd from BPF_ENABLE_STATS is open the kernel sums, for every BPF program, the time it
ran and how often (bpf_prog_info.run_time_ns / run_cnt): the cost of a tracer's programs per
event, independent of how busy the shared host is.  No global setting (kernel.bpf_stats_enabled)
is changed or left behind.  Programs are found per tracer: those a bcc object in this process
loaded (by fd), or those another process attached (bpftool perf: pid -> program id, tracepoint).
The kernel's own per-event work before a program runs (tracepoint, dispatch) is in none of these
figures: measure that once as a floor (an empty program) against untraced runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvmbpf.bpf import bpf_syscall  # noqa: E402

BPF_OBJ_GET_INFO_BY_FD, BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 15, 32, 0
INFO_SIZE, INFO_ID, INFO_RUN_TIME_NS, INFO_RUN_CNT = 232, 4, 192, 200   # struct bpf_prog_info


@dataclass(frozen=True)
class Cost:
    """Run time and runs of a tracer's programs on one tracepoint over a measurement."""
    ns: int
    runs: int

    @property
    def per_event(self) -> float:
        return self.ns / self.runs if self.runs else 0.0

    def __add__(self, other: "Cost") -> "Cost":
        """Two programs on the same tracepoint: their times add up, the events do not."""
        return Cost(self.ns + other.ns, max(self.runs, other.runs))


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Run-time statistics on for the block (Linux 5.8+)."""
    fd = bpf_syscall(BPF_ENABLE_STATS, ctypes.create_string_buffer(struct.pack("I", BPF_STATS_RUN_TIME)))
    if fd < 0:
        raise SystemExit(f"BPF_ENABLE_STATS failed: {os.strerror(-fd)}")
    try:
        yield
    finally:
        os.close(fd)


def prog_id(fd: int) -> int:
    info = ctypes.create_string_buffer(INFO_SIZE)
    attr = ctypes.create_string_buffer(struct.pack("IIQ", fd, INFO_SIZE, ctypes.addressof(info)))
    if bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, attr) < 0:
        raise SystemExit(f"no program behind fd {fd}")
    return struct.unpack_from("I", info, INFO_ID)[0]


def bcc_programs(bpf) -> dict[int, str]:
    """Program id -> tracepoint of every TRACEPOINT_PROBE a bcc.BPF object in this process loaded."""
    return {prog_id(fn.fd): fn.name.decode().rsplit("__", 1)[-1] for fn in bpf.funcs.values()}


def attached_by(pid: int) -> dict[int, str]:
    """Program id -> tracepoint of every (raw) tracepoint program process `pid` attached."""
    out = subprocess.run(["bpftool", "-j", "perf"], capture_output=True, text=True, check=True).stdout
    return {a["prog_id"]: a["tracepoint"] for a in json.loads(out or "[]")
            if a.get("pid") == pid and "tracepoint" in a}


def wait_attached(pid: int, count: int, timeout: float = 30.0) -> dict[int, str]:
    """A tracer's programs once it has attached `count` of them (bpftrace attaches one by one)."""
    deadline = time.monotonic() + timeout
    while len(progs := attached_by(pid)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"pid {pid}: {len(progs)} tracepoint programs attached, expected {count}")
        time.sleep(0.1)
    return progs


def totals() -> dict[int, Cost]:
    """Cumulative run time and runs of every loaded program, by id."""
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: Cost(p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in json.loads(out)}


def per_event(before: dict[int, Cost], after: dict[int, Cost], progs: dict[int, str]) -> dict[str, Cost]:
    """Tracepoint -> a tracer's cost there between two totals() (its programs summed)."""
    out: dict[str, Cost] = {}
    for prog, event in progs.items():
        delta = Cost(after[prog].ns - before[prog].ns, after[prog].runs - before[prog].runs)
        out[event] = out.get(event, Cost(0, 0)) + delta
    return out


def start_tracer(cmd: list[str], ready: str, programs: int,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict[int, str]]:
    """Start a tracer process; return once it printed a line starting with `ready` and holds
    `programs` BPF programs (bpftrace prints its banner before attaching)."""
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if not line.startswith(ready):
        stop_tracer(proc)
        raise SystemExit(f"{cmd[0]}: tracer did not start ({line!r})")
    try:
        return proc, wait_attached(proc.pid, programs)
    except SystemExit:
        stop_tracer(proc)
        raise


def stop_tracer(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGINT (tracers print their results), SIGKILL if still there after `timeout`."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
