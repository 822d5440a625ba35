"""Steal: how long each vCPU thread waited for a host CPU, and who held the CPU meanwhile.

A vCPU thread that is runnable but not running is time the guest loses (the
guest sees it as steal).  The BPF side keeps cumulative per-vCPU wait
histograms, totals and per-culprit totals; this side turns them into per-interval
deltas labelled with VM names.

Culprit attribution (in the BPF program): every task that runs on the CPU a vCPU
waits for is charged the time it ran during the wait, so one wait's charges add up
to the wait.  Time no task can be named for (a migration between two switches, or
more waiting vCPUs on one CPU than the program has slots for) is charged to an
explicit "(unattributed)" culprit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracefs
from ..hist import Histogram
from ..inventory import VM, Thread
from ..snapshot import LATENCY_COLUMNS, Metric, TableData, fmt_ns, latency_cells, loss_notes
from .base import BaseCollector, Scope, histograms

_FLAGS_RE = re.compile(r"__print_flags\((.*?)\)\s*:", re.S)
_FLAG_PAIR_RE = re.compile(r'\{\s*(0x[0-9a-fA-F]+|\d+)\s*,\s*"[^"]*"\s*\}')
UNATTRIBUTED = 0xffffffff        # culprit tid the BPF program uses for unnamed wait time
SLOTS = 8                        # waiting vCPUs tracked per host CPU (NSLOTS)


def runnable_state_mask(print_fmt: str) -> int:
    """The prev_state bits of sched_switch that mean "not runnable" (its flag table, ORed).

    A preempted task reports 0 or only the "preempted" bit just above these.
    """
    m = _FLAGS_RE.search(print_fmt)
    flags = [int(v, 0) for v in _FLAG_PAIR_RE.findall(m.group(1))] if m else []
    if not flags:
        raise ValueError("sched_switch print fmt has no prev_state flag table")
    mask = 0
    for flag in flags:
        mask |= flag
    return mask


@dataclass
class Culprit:
    """A task that held the CPU a vCPU was waiting for."""
    comm: str
    tid: int
    pid: int | None          # its process; None once gone
    vm: str | None           # set when the culprit is a thread of a VM
    vcpu: int | None         # set when it is a vCPU thread
    wait_ns: int

    @property
    def label(self) -> str:
        if self.tid == -1:
            return "(unattributed)"
        if self.vm is not None:
            return f"{self.vm}/vcpu{self.vcpu}" if self.vcpu is not None else f"{self.vm}/{self.comm}"
        if self.tid == 0:
            return "idle"
        return f"{self.comm}[{self.pid if self.pid is not None else self.tid}]"


@dataclass
class VcpuSteal:
    vcpu: int | None
    tid: int
    waits: int
    wait_ns: int
    steal_pct: float          # wait_ns / interval
    latency: Histogram
    culprits: list[Culprit]
    gone: bool = False        # the thread went away during this interval (reported once)


@dataclass
class VmSteal:
    name: str
    pid: int
    wait_ns: int
    steal_pct: float          # mean over its vCPUs
    vcpus: list[VcpuSteal]
    culprits: list[Culprit]   # merged over its vCPUs
    gone: bool = False


@dataclass
class StealSnapshot:
    interval_s: float
    vms: list[VmSteal]
    overflow: int             # events lost to full maps since start
    unmatched: int            # vCPU switch-ins whose wait start was not seen, since start
    no_slot: int              # waits that found their CPU's slots full, since start
    missed: int               # sched events the kernel kept from the programs, this interval
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        total = sum(vm.wait_ns for vm in self.vms)
        vcpus = sum(len(vm.vcpus) for vm in self.vms)
        return (f"steal: {len(self.vms)} VM(s), {vcpus} vCPU(s), run-queue wait {fmt_ns(total)} "
                f"in {self.interval_s:.2f}s")

    def tables(self, top: int) -> list[TableData]:
        notes = loss_notes(self.overflow, self.missed)
        if self.unmatched:
            notes.append(f"{self.unmatched} waits with an unseen start (first after attach, "
                         "or sched events the kernel did not run BPF for)")
        if self.no_slot:
            notes.append(f"{self.no_slot} waits with more waiting vCPUs on their CPU than slots: "
                         "only the last holder named, the rest unattributed")
        vcpu_rows = [[vm.name + (" (gone)" if c.gone else ""), _vcpu_name(c), c.waits,
                      fmt_ns(c.wait_ns), f"{c.steal_pct:.1f}", *latency_cells(c.latency)]
                     for vm in self.vms for c in vm.vcpus]
        vcpu_rows.sort(key=lambda r: -float(r[4]))
        culprit_rows = sorted(([vm.name, cul.label, cul.tid, fmt_ns(cul.wait_ns),
                                f"{100 * cul.wait_ns / vm.wait_ns:.0f}" if vm.wait_ns else "-"]
                               for vm in self.vms for cul in vm.culprits[:top]),
                              key=lambda r: r[0])
        return [TableData("run-queue wait per vCPU (host steal)",
                          ["vm", "vcpu", "waits", "waited", "steal%", *LATENCY_COLUMNS],
                          vcpu_rows[:top], notes),
                TableData("who held the CPU while vCPUs waited (each task: the time it ran)",
                          ["vm", "culprit", "tid", "time", "% of vm wait"], culprit_rows)]

    def metrics(self) -> list[Metric]:
        return self._metrics


def _vcpu_name(c: VcpuSteal) -> str:
    return f"vcpu{c.vcpu}" if c.vcpu is not None else f"tid-{c.tid}"


def process_of(tid: int) -> int | None:
    """The tgid of a thread (from /proc/<tid>/status), None if it is gone."""
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def label_culprit(tid: int, comm: str, wait_ns: int,
                  by_tid: dict[int, tuple[VM, Thread]]) -> Culprit:
    """Name a culprit: a VM's thread by VM name (and vCPU), anything else by comm and pid;
    tid -1 for wait time no task could be named for."""
    if tid == UNATTRIBUTED:
        return Culprit("(unattributed)", -1, None, None, None, wait_ns)
    hit = by_tid.get(tid)
    if hit is not None:
        vm, thread = hit
        return Culprit(comm, tid, vm.pid, vm.name, thread.vcpu, wait_ns)
    return Culprit(comm, tid, process_of(tid) if tid else 0, None, None, wait_ns)


def merge_culprits(groups: list[list[Culprit]]) -> list[Culprit]:
    """One list over several vCPUs: same task (tid, comm) summed, biggest first."""
    merged: dict[tuple[int, str], Culprit] = {}
    for group in groups:
        for c in group:
            key = (c.tid, c.comm)
            if key in merged:
                merged[key].wait_ns += c.wait_ns
            else:
                merged[key] = Culprit(c.comm, c.tid, c.pid, c.vm, c.vcpu, c.wait_ns)
    return sorted(merged.values(), key=lambda c: -c.wait_ns)


def steal_pct(wait_ns: int, interval_s: float, vcpus: int = 1) -> float:
    """Waiting time as a share of the interval (per vCPU)."""
    if interval_s <= 0 or vcpus <= 0:
        return 0.0
    return 100.0 * wait_ns / (interval_s * 1e9 * vcpus)


class StealCollector(BaseCollector):
    """kvmbpf steal: run-queue delay per vCPU thread and who caused it."""

    program_name = "steal"

    def __init__(self, scope: Scope, slots: int = SLOTS):
        mask = runnable_state_mask(tracefs.read_format("sched", "sched_switch").print_fmt)
        self.reported: dict[tuple[int, int], int | None] = {}   # (tgid, tid) -> vcpu, last interval
        self.known: dict[int, int | None] = {}                  # tid -> vcpu index, ever seen
        super().__init__(scope, {"STATE_MASK": mask, "NSLOTS": slots})

    def update_filters(self) -> None:
        """vCPU tids in; stale wait starts of threads no longer traced out (they never end;
        the BPF side frees their CPU slots when it finds no record)."""
        tids = self.scope.vcpu_tids()
        self.program.fill("traced_tids", tids)
        starts = self.program.table("runnable_at")
        for key in [k for k in starts.keys() if k.value not in tids]:
            starts.pop(key, None)

    def snapshot(self) -> StealSnapshot:
        """Maps first (the interval ends there), then the inventory for names and filters."""
        elapsed = self.interval.tick()
        hists = histograms(self.read_delta("waits"))
        totals = self.read_delta("wait_ns")
        culprit_rows = self.read_delta("culprit_ns")
        unmatched, overflow = sum(self.program.read("unmatched").values()), self.overflow()
        no_slot = sum(self.program.read("no_slot").values())
        self.refresh()
        current = {(vm.pid, t.tid): t.vcpu for vm in self.scope.vms for t in vm.vcpus
                   if not self.scope.vcpus or t.vcpu in self.scope.vcpus}
        self.known.update({tid: vcpu for (_, tid), vcpu in current.items()})
        gone = {key for key in self.reported if key not in current}
        keys = set(current) | gone | set(totals)
        by_tid = self.scope.inv.by_tid()
        culprits: dict[tuple[int, int], list[Culprit]] = {}
        for (tgid, tid, ctid, comm), ns in culprit_rows.items():
            culprits.setdefault((tgid, tid), []).append(label_culprit(ctid, comm, ns, by_tid))
        rows: dict[int, list[VcpuSteal]] = {}
        for tgid, tid in sorted(keys):
            wait = totals.get((tgid, tid), 0)
            hist = hists.get((tgid, tid), Histogram())
            rows.setdefault(tgid, []).append(VcpuSteal(
                self.known.get(tid), tid, hist.count, wait, steal_pct(wait, elapsed),
                hist, sorted(culprits.get((tgid, tid), []), key=lambda c: -c.wait_ns),
                gone=(tgid, tid) not in current))
        self.reported = current
        vms = [self._vm_row(tgid, vcpus, elapsed) for tgid, vcpus in sorted(rows.items())]
        return StealSnapshot(round(elapsed, 6), vms, overflow, unmatched, no_slot, self.missed(),
                             self._metrics())

    def _vm_row(self, tgid: int, vcpus: list[VcpuSteal], elapsed: float) -> VmSteal:
        vcpus.sort(key=lambda c: (c.vcpu is None, c.vcpu or 0, c.tid))
        wait = sum(c.wait_ns for c in vcpus)
        live = [c for c in vcpus if not c.gone]
        return VmSteal(self.scope.vm_name(tgid), tgid, wait,
                       steal_pct(wait, elapsed, len(vcpus)), vcpus,
                       merge_culprits([c.culprits for c in vcpus]),
                       gone=not live)

    def _metrics(self) -> list[Metric]:
        """Cumulative since start: the maps' current contents, labelled."""
        cumulative = self.interval.last_counts
        out = []
        for (tgid, tid), ns in cumulative.get("wait_ns", {}).items():
            out.append(Metric("kvmbpf_steal_wait_seconds_total", "counter",
                              "Time vCPU threads spent runnable but not running",
                              self._labels(tgid, tid), ns / 1e9))
        for (tgid, tid), hist in histograms(cumulative.get("waits", {})).items():
            out.append(Metric("kvmbpf_steal_wait_seconds", "histogram",
                              "Run-queue delay of vCPU threads", self._labels(tgid, tid),
                              hist=hist, scale=1e-9))
        return out

    def _labels(self, tgid: int, tid: int) -> dict[str, str]:
        vcpu = self.known.get(tid)
        return {"vm": self.scope.vm_name(tgid), "vcpu": str(vcpu) if vcpu is not None else f"tid-{tid}"}
