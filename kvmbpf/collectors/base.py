"""What every collector shares: which VMs are in scope, the filter maps, labels, deltas.

Keys in BPF maps carry ids (tgid, tid, dev_t, ...); the Scope turns them into
names at read time from a fresh inventory, so VMs that start, stop or are
renamed while tracing need no reload.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import inventory
from ..bpf import Program
from ..errors import KvmbpfError
from ..hist import Histogram


@dataclass
class Scope:
    """The VMs a command traces: by name, by pid, or all (re-resolved every interval)."""
    names: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    vcpus: tuple[int, ...] = ()
    inv: inventory.Inventory = field(default_factory=lambda: inventory.Inventory([]))
    vms: list[inventory.VM] = field(default_factory=list)
    gone: dict[int, str] = field(default_factory=dict)   # tgid -> name, VMs that went away

    def refresh(self, strict: bool = False) -> list[inventory.VM]:
        """Rescan the host; with strict, an unknown --vm/--pid is an error (at start)."""
        previous = {vm.pid: vm.name for vm in self.vms}
        self.inv = inventory.scan()
        try:
            self.vms = self.inv.select(self.names, self.pids)
        except KvmbpfError:
            if strict:
                raise
            wanted = set(self.names)
            self.vms = [vm for vm in self.inv.vms if vm.name in wanted or vm.pid in self.pids]
        if strict and self.vcpus:
            known = {t.vcpu for vm in self.vms for t in vm.vcpus}
            missing = sorted(set(self.vcpus) - known)
            if missing:
                raise KvmbpfError(f"no vCPU {missing[0]} in the selected VMs "
                                  f"(vCPUs: {', '.join(map(str, sorted(known))) or 'none'})")
        current = {vm.pid for vm in self.vms}
        self.gone.update({pid: name for pid, name in previous.items() if pid not in current})
        return self.vms

    def tgids(self) -> dict[int, int]:
        """Filter map content: VM pid -> VM pid."""
        return {vm.pid: vm.pid for vm in self.vms}

    def vcpu_tids(self) -> dict[int, int]:
        """Filter map content: vCPU thread id -> VM pid (limited to --vcpu when given)."""
        return {t.tid: vm.pid for vm in self.vms for t in vm.vcpus
                if not self.vcpus or t.vcpu in self.vcpus}

    def all_tids(self) -> dict[int, int]:
        """Every thread of the VMs in scope -> VM pid."""
        return {t.tid: vm.pid for vm in self.vms for t in vm.threads}

    def vm_name(self, tgid: int) -> str:
        for vm in self.inv.vms:
            if vm.pid == tgid:
                return vm.name
        return self.gone.get(tgid, f"pid-{tgid}")

    def thread_label(self, tid: int) -> str:
        """'vcpu0' for a vCPU thread, else the thread's name (e.g. 'worker', 'iou-wrk-123')."""
        hit = self.inv.by_tid().get(tid)
        if hit is None:
            return f"tid-{tid}"
        _, thread = hit
        return f"vcpu{thread.vcpu}" if thread.vcpu is not None else thread.comm


class Interval:
    """Turns cumulative map reads into per-interval deltas (maps are never cleared)."""

    def __init__(self) -> None:
        self.last_counts: dict[str, dict[tuple, int]] = {}
        self.last_time = time.monotonic()
        self.start_time = self.last_time

    def counts(self, name: str, current: dict[tuple, int]) -> dict[tuple, int]:
        before = self.last_counts.get(name, {})
        self.last_counts[name] = current
        return {k: v - before.get(k, 0) for k, v in current.items() if v - before.get(k, 0)}

    def tick(self) -> float:
        """Seconds since the previous tick."""
        now = time.monotonic()
        elapsed, self.last_time = now - self.last_time, now
        return elapsed


def histograms(counts: dict[tuple, int]) -> dict[tuple, Histogram]:
    """Group counter-map rows keyed (..., slot) into one Histogram per key prefix."""
    out: dict[tuple, Histogram] = {}
    for key, n in counts.items():
        out.setdefault(key[:-1], Histogram()).add(key[-1], n)
    return out


class BaseCollector:
    """Loads one BPF program, keeps its filter maps current, reads deltas."""

    program_name = ""

    def __init__(self, scope: Scope, params: dict[str, int] | None = None):
        self.scope = scope
        scope.refresh(strict=True)
        self.program = Program(self.program_name, params or {})
        self.interval = Interval()
        self.update_filters()

    def update_filters(self) -> None:
        """Fill the program's filter maps from the scope; subclasses choose which."""
        self.program.fill("traced_tgids", self.scope.tgids())

    def refresh(self) -> None:
        self.scope.refresh()
        self.update_filters()

    def read_delta(self, map_name: str) -> dict[tuple, int]:
        return self.interval.counts(map_name, self.program.read(map_name))

    def overflow(self) -> int:
        """Events lost because a bounded map was full (shown, never silent)."""
        return sum(self.program.read("overflow").values())

    def missed(self) -> int:
        """Events the kernel kept from our programs this interval (its recursion guard:
        another BPF program was running on that CPU).  Shown, never silent."""
        return self.interval.counts("missed", {(): self.program.missed_events()}).get((), 0)

    def close(self) -> None:
        self.program.close()
