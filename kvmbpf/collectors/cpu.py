"""CPU: where each VM's host CPU time goes (guest, VMM user, host kernel, run-queue wait).

No tracing: the kernel already accounts this per thread in /proc.  utime
includes guest time, so VMM user time is utime - guest_time.  Run-queue wait is
field 2 of /proc/<pid>/task/<tid>/schedstat (summed over the VM's live threads).

On a PVM host (/dev/kvm without VMX/SVM) guest execution is not accounted as
guest time: a vCPU spinning in the guest shows ~100 % system time and 0 % guest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..snapshot import Metric, TableData, fmt_ns
from .base import Interval, Scope

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
MODES = ("guest", "user", "system", "runq_wait")


@dataclass(frozen=True)
class Times:
    """CPU time of one task or VM, in ns (ticks converted)."""
    guest: int = 0
    user: int = 0             # VMM user time, without guest time
    system: int = 0
    runq_wait: int = 0

    def __sub__(self, older: "Times") -> "Times":
        return Times(*(max(0, a - b) for a, b in zip(self.values(), older.values())))

    def __add__(self, other: "Times") -> "Times":
        return Times(*(a + b for a, b in zip(self.values(), other.values())))

    def values(self) -> tuple[int, int, int, int]:
        return (self.guest, self.user, self.system, self.runq_wait)


def parse_stat(text: str) -> Times:
    """guest, user-without-guest and system time from a /proc/.../stat line (comm may hold ')')."""
    fields = text.rsplit(")", 1)[1].split()
    utime, stime, gtime = int(fields[11]), int(fields[12]), int(fields[40])
    return Times(gtime * TICK_NS, max(0, utime - gtime) * TICK_NS, stime * TICK_NS)


def parse_schedstat(text: str) -> int:
    """Run-queue wait in ns: field 2 of /proc/<pid>/task/<tid>/schedstat."""
    return int(text.split()[1])


def parse_host_stat(text: str) -> Times:
    """Host-wide guest/user/system time from the `cpu` line of /proc/stat (no run-queue total)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            user, nice, system, irq, softirq = v[0], v[1], v[2], v[5], v[6]
            guest = v[8] + v[9] if len(v) > 9 else 0
            return Times(guest * TICK_NS, max(0, user + nice - guest) * TICK_NS,
                         (system + irq + softirq) * TICK_NS)
    raise ValueError("/proc/stat has no cpu line")


def pct(ns: int, interval_s: float) -> float:
    """Share of one CPU over the interval (100 = one CPU busy all the time)."""
    return round(100.0 * ns / (interval_s * 1e9), 1) if interval_s > 0 else 0.0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def read_vm(pid: int, tids: list[int]) -> tuple[Times | None, dict[int, Times]]:
    """The process's cumulative times (exited threads included) and each live thread's."""
    proc = _read(f"/proc/{pid}/stat")
    threads = {}
    for tid in tids:
        stat = _read(f"/proc/{pid}/task/{tid}/stat")
        sched = _read(f"/proc/{pid}/task/{tid}/schedstat")
        if stat and sched:
            threads[tid] = parse_stat(stat) + Times(runq_wait=parse_schedstat(sched))
    return (parse_stat(proc) if proc else None), threads


@dataclass
class CpuRow:
    """Percent of one CPU, per category, over the interval."""
    guest_pct: float
    user_pct: float
    system_pct: float
    runq_wait_pct: float
    runq_wait_ns: int

    @classmethod
    def of(cls, t: Times, interval_s: float) -> "CpuRow":
        return cls(pct(t.guest, interval_s), pct(t.user, interval_s), pct(t.system, interval_s),
                   pct(t.runq_wait, interval_s), t.runq_wait)


@dataclass
class VcpuCpu:
    vcpu: int
    tid: int
    cpu: CpuRow


@dataclass
class VmCpu:
    name: str
    pid: int
    cpu: CpuRow
    vcpus: list[VcpuCpu]


@dataclass
class CpuSnapshot:
    interval_s: float
    host_cpus: int
    host: CpuRow                 # whole host; runq wait not available (no CONFIG_SCHEDSTATS)
    vms: list[VmCpu]
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        h = self.host
        return (f"cpu: {len(self.vms)} VM(s); host ({self.host_cpus} CPUs = {100 * self.host_cpus}%): "
                f"guest {h.guest_pct}% user {h.user_pct}% sys {h.system_pct}%")

    def tables(self, top: int) -> list[TableData]:
        def cells(r: CpuRow) -> list:
            return [r.guest_pct, r.user_pct, r.system_pct, r.runq_wait_pct, fmt_ns(r.runq_wait_ns)]
        vms = sorted(self.vms, key=lambda v: -(v.cpu.guest_pct + v.cpu.user_pct + v.cpu.system_pct))
        rows = [[vm.name, "all", *cells(vm.cpu)] for vm in vms[:top]]
        rows += [[vm.name, f"vcpu{c.vcpu}", *cells(c.cpu)] for vm in vms[:top] for c in vm.vcpus]
        rows.append(["(host)", "all", self.host.guest_pct, self.host.user_pct,
                     self.host.system_pct, "-", "-"])
        return [TableData("host CPU per VM (% of one CPU)",
                          ["vm", "threads", "guest%", "vmm user%", "sys%", "runq wait%", "waited"],
                          rows, ["PVM hosts account guest execution as sys%, not guest%"])]

    def metrics(self) -> list[Metric]:
        return self._metrics


class CpuCollector:
    """kvmbpf cpu: /proc accounting per VM, as deltas between intervals."""

    def __init__(self, scope: Scope):
        self.scope = scope
        scope.refresh(strict=True)
        self.interval = Interval()
        self.last: dict[int, tuple[Times, dict[int, Times]]] = {}
        self.cumulative: dict[int, Times] = {}
        self.last_host = parse_host_stat(Path("/proc/stat").read_text())
        self._read_all()

    def _read_all(self) -> dict[int, tuple[Times, dict[int, Times]]]:
        now = {}
        for vm in self.scope.vms:
            proc, threads = read_vm(vm.pid, [t.tid for t in vm.threads])
            if proc is not None:
                now[vm.pid] = (proc, threads)
        previous, self.last = self.last, now
        return previous

    def snapshot(self) -> CpuSnapshot:
        self.scope.refresh()
        previous = self._read_all()
        elapsed = self.interval.tick()
        host = parse_host_stat(Path("/proc/stat").read_text())
        host_delta, self.last_host = host - self.last_host, host
        vms = []
        for vm in self.scope.vms:
            if vm.pid not in self.last or vm.pid not in previous:
                continue           # first seen this interval: baseline only
            delta, per_thread = vm_delta(previous[vm.pid], self.last[vm.pid])
            self.cumulative[vm.pid] = self.cumulative.get(vm.pid, Times()) + delta
            vcpus = [VcpuCpu(t.vcpu, t.tid, CpuRow.of(per_thread[t.tid], elapsed))
                     for t in vm.vcpus if t.tid in per_thread]
            vms.append(VmCpu(vm.name, vm.pid, CpuRow.of(delta, elapsed), vcpus))
        return CpuSnapshot(round(elapsed, 6), os.cpu_count() or 1, CpuRow.of(host_delta, elapsed),
                           vms, self._metrics())

    def _metrics(self) -> list[Metric]:
        return [Metric("kvmbpf_cpu_seconds_total", "counter",
                       "Host CPU time of a VM's threads by category",
                       {"vm": self.scope.vm_name(pid), "mode": mode}, ns / 1e9)
                for pid, t in self.cumulative.items() for mode, ns in zip(MODES, t.values())]

    def close(self) -> None:
        """Nothing to detach: /proc only."""


def vm_delta(old: tuple[Times, dict[int, Times]], new: tuple[Times, dict[int, Times]]
             ) -> tuple[Times, dict[int, Times]]:
    """VM totals from the process line (exited threads count), run-queue wait summed per thread.

    A thread new since the previous read counts from zero (it started in the interval).
    """
    (old_proc, old_threads), (new_proc, new_threads) = old, new
    per_thread = {tid: t - old_threads.get(tid, Times()) for tid, t in new_threads.items()}
    wait = sum(t.runq_wait for t in per_thread.values())
    return (new_proc - old_proc) + Times(runq_wait=wait), per_thread
