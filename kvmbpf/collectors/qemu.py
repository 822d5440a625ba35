"""QEMU functions: how often chosen VMM functions run, in which VM thread, and how long they take.

Uprobes on the VM's own binary, counted in the kernel per (VM, thread,
function).  A uprobe costs about 1.5 us per hit (a trap into the kernel and
back), so before tracing for real the collector measures each function's rate
for a moment and refuses functions hotter than --max-rate unless forced.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..elfprobes import ProbePoints, discover
from ..errors import KvmbpfError
from ..hist import Histogram
from ..snapshot import LATENCY_COLUMNS, Metric, TableData, latency_cells, loss_notes
from .base import BaseCollector, Scope, histograms

#: Published cost of one uprobe hit (entry); a uretprobe roughly doubles it.
UPROBE_COST_NS = 1500
MAX_FUNCS = 16          # on_entry_0..15 in qemu.bpf.c

#: Ready-made sets: candidate functions per question, in QEMU's call order.  Only
#: those the binary exports are used (static functions vanish from stripped builds).
PROBE_SETS: dict[str, tuple[str, ...]] = {
    "blk": ("virtio_blk_handle_vq", "virtio_blk_process_req", "blk_aio_preadv", "blk_aio_pwritev",
            "blk_aio_flush", "virtio_blk_req_complete"),
    "net": ("virtio_net_flush_tx", "qemu_sendv_packet_async", "qemu_send_packet", "tap_send",
            "qemu_send_packet_async", "qemu_deliver_packet_iov", "virtio_net_receive"),
    "vcpu": ("kvm_cpu_exec", "kvm_arch_handle_exit", "memory_region_dispatch_write",
             "memory_region_dispatch_read"),
}


def choose_functions(points: ProbePoints, funcs: tuple[str, ...], sets: tuple[str, ...]) -> list[str]:
    """The functions to trace: the named ones (must exist) plus the sets' available members."""
    chosen = [s.name for s in points.require(list(funcs))]
    for name in sets:
        if name not in PROBE_SETS:
            raise KvmbpfError(f"unknown probe set {name!r} (sets: {', '.join(PROBE_SETS)})")
        available = [f for f in PROBE_SETS[name] if f in points.functions]
        if not available:
            raise KvmbpfError(f"{points.binary} exports none of the {name!r} set's functions")
        chosen += available
    chosen = list(dict.fromkeys(chosen))
    if not chosen:
        raise KvmbpfError("name at least one function (or --set blk|net|vcpu)")
    if len(chosen) > MAX_FUNCS:
        raise KvmbpfError(f"{len(chosen)} functions: at most {MAX_FUNCS} per run")
    return chosen


def overhead_pct(calls: int, seconds: float, latency: bool) -> float:
    """Estimated share of one CPU spent in the probes themselves."""
    if seconds <= 0:
        return 0.0
    per_call = UPROBE_COST_NS * (2 if latency else 1)
    return 100.0 * calls * per_call / (seconds * 1e9)


def hot_functions(calls: dict[str, int], seconds: float, max_rate: float) -> dict[str, float]:
    """Function -> calls/s, for those above max_rate."""
    if seconds <= 0:
        return {}
    rates = {f: n / seconds for f, n in calls.items()}
    return {f: r for f, r in rates.items() if r > max_rate}


@dataclass
class ThreadCalls:
    """One function in one VM thread."""
    vm: str
    pid: int
    thread: str              # vcpu0, main, worker, ...
    tid: int
    function: str
    calls: int
    rate: float              # calls/s over the interval
    latency: Histogram | None


@dataclass
class FunctionCalls:
    """One function in one VM, all threads together."""
    vm: str
    pid: int
    function: str
    calls: int
    rate: float
    latency: Histogram | None


@dataclass
class QemuSnapshot:
    interval_s: float
    binaries: list[str]
    functions: list[str]
    vms: list[FunctionCalls]
    threads: list[ThreadCalls]
    overhead_pct: float       # estimated CPU share of the probes (~1.5 us per hit)
    overflow: int
    missed: int               # uprobe hits the kernel kept from the programs, this interval
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        calls = sum(r.calls for r in self.vms)
        return (f"qemu: {len(self.functions)} function(s), {calls} calls in {self.interval_s:.2f}s, "
                f"probe cost ~{self.overhead_pct:.2f}% of a CPU")

    def tables(self, top: int) -> list[TableData]:
        timed = any(r.latency is not None for r in self.vms)
        lat_cols = LATENCY_COLUMNS if timed else []
        notes = loss_notes(self.overflow, self.missed)

        def cells(h: Histogram | None) -> list[str]:
            return latency_cells(h) if h is not None and h.count else ["-"] * len(lat_cols)

        vm_rows = [[r.vm, r.function, r.calls, f"{r.rate:.0f}", *cells(r.latency)[:len(lat_cols)]]
                   for r in sorted(self.vms, key=lambda r: -r.calls)]
        thread_rows = [[r.vm, r.thread, r.tid, r.function, r.calls, f"{r.rate:.0f}",
                        *cells(r.latency)[:len(lat_cols)]]
                       for r in sorted(self.threads, key=lambda r: -r.calls)]
        return [TableData("calls per VM", ["vm", "function", "calls", "calls/s", *lat_cols],
                          vm_rows[:top], notes),
                TableData("calls per VM thread", ["vm", "thread", "tid", "function", "calls",
                                                  "calls/s", *lat_cols], thread_rows[:top])]

    def metrics(self) -> list[Metric]:
        return self._metrics


class QemuCollector(BaseCollector):
    """kvmbpf qemu trace: uprobes on VMM functions, counted per VM thread."""

    program_name = "qemu"

    def __init__(self, scope: Scope, funcs: tuple[str, ...], sets: tuple[str, ...] = (),
                 latency: bool = False, max_rate: float = 20000, force: bool = False,
                 guard_s: float = 1.0):
        scope.refresh(strict=True)
        self.binaries = _binaries(scope)
        points = [discover(b) for b in self.binaries]
        self.functions = choose_functions(points[0], funcs, sets)
        for other in points[1:]:
            other.require(self.functions)
        self.latency = latency
        super().__init__(scope, {"NFUNCS": len(self.functions), "LATENCY": int(latency)})
        try:
            self._attach()
            if not force:
                self._rate_guard(max_rate, guard_s)
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        for binary in self.binaries:
            for i, func in enumerate(self.functions):
                self.program.attach_uprobe(binary, func, f"on_entry_{i}")
                if self.latency:
                    self.program.attach_uprobe(binary, func, f"on_return_{i}", ret=True)

    def _rate_guard(self, max_rate: float, seconds: float) -> None:
        """Measure each function's rate for a moment; refuse (detach) the hot ones."""
        start = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - start
        per_func: dict[str, int] = {}
        for (_, _, func), n in self.program.read("calls").items():
            per_func[self.functions[func]] = per_func.get(self.functions[func], 0) + n
        hot = hot_functions(per_func, elapsed, max_rate)
        if hot:
            name, rate = max(hot.items(), key=lambda kv: kv[1])
            raise KvmbpfError(
                f"{name} runs {rate:,.0f} times/s (> --max-rate {max_rate:,.0f}); at ~1.5us per "
                f"uprobe hit that costs ~{overhead_pct(int(rate), 1.0, self.latency):.1f}% of a CPU "
                f"and slows the VM: use --force to trace it anyway")

    def snapshot(self) -> QemuSnapshot:
        self.refresh()
        elapsed = self.interval.tick()
        calls = self.read_delta("calls")
        hists = histograms(self.read_delta("latency")) if self.latency else {}
        threads = [ThreadCalls(self.scope.vm_name(tgid), tgid, self._thread(tgid, tid), tid,
                               self.functions[func], n, _rate(n, elapsed),
                               hists.get((tgid, tid, func), Histogram()) if self.latency else None)
                   for (tgid, tid, func), n in sorted({**{k: 0 for k in hists}, **calls}.items())]
        vms = _per_vm(threads, elapsed, self.latency)
        total = sum(r.calls for r in vms)
        return QemuSnapshot(round(elapsed, 6), self.binaries, self.functions, vms, threads,
                            overhead_pct(total, elapsed, self.latency), self.overflow(),
                            self.missed(), self._metrics())

    def _thread(self, tgid: int, tid: int) -> str:
        return "main" if tid == tgid else self.scope.thread_label(tid)

    def _metrics(self) -> list[Metric]:
        """Cumulative since start, per VM and function."""
        cumulative = self.interval.last_counts
        totals: dict[tuple[int, int], int] = {}
        for (tgid, _, func), n in cumulative.get("calls", {}).items():
            totals[(tgid, func)] = totals.get((tgid, func), 0) + n
        out = [Metric("kvmbpf_qemu_calls_total", "counter", "Calls of a traced VMM function",
                      self._labels(tgid, func), n) for (tgid, func), n in sorted(totals.items())]
        merged: dict[tuple[int, int], Histogram] = {}
        for (tgid, _, func), hist in histograms(cumulative.get("latency", {})).items():
            merged[(tgid, func)] = merged.get((tgid, func), Histogram()) + hist
        out += [Metric("kvmbpf_qemu_call_seconds", "histogram", "Duration of a traced VMM function",
                       self._labels(tgid, func), hist=h, scale=1e-9)
                for (tgid, func), h in sorted(merged.items())]
        return out

    def _labels(self, tgid: int, func: int) -> dict[str, str]:
        return {"vm": self.scope.vm_name(tgid), "function": self.functions[func]}


def _binaries(scope: Scope) -> list[str]:
    """The VMM executables of the VMs in scope (each gets the same uprobes)."""
    if not scope.vms:
        raise KvmbpfError("no KVM VMs to trace on this host")
    paths = sorted({vm.vmm for vm in scope.vms})
    for path in paths:
        if path.endswith(" (deleted)"):
            raise KvmbpfError(f"the VMM binary {path} was replaced on disk: restart the VM to trace it")
    return paths


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def _per_vm(threads: list[ThreadCalls], elapsed: float, latency: bool) -> list[FunctionCalls]:
    merged: dict[tuple[int, str], FunctionCalls] = {}
    for r in threads:
        row = merged.get((r.pid, r.function))
        if row is None:
            row = merged[(r.pid, r.function)] = FunctionCalls(r.vm, r.pid, r.function, 0, 0.0,
                                                              Histogram() if latency else None)
        row.calls += r.calls
        if latency and r.latency is not None:
            row.latency = row.latency + r.latency
    for row in merged.values():
        row.rate = _rate(row.calls, elapsed)
    return sorted(merged.values(), key=lambda r: (r.vm, -r.calls))
