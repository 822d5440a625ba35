"""Exits: why each vCPU leaves the guest, how long that costs, and what the VMM does.

Five views from one BPF program (bpf_programs/exits.bpf.c), all keyed by VM:
  - hardware exit reasons (kvm:kvm_exit) per vCPU, with the time until the next
    kvm:kvm_entry on the same thread (handling latency; idle time for HLT-like exits);
  - exits to the VMM (kvm:kvm_userspace_exit) per vCPU thread by KVM_EXIT_* name,
    with the time the VMM took until that thread called ioctl(KVM_RUN) again;
  - PIO ports and MMIO addresses the guest touched (kvm:kvm_pio, kvm:kvm_mmio);
  - instructions KVM emulated (kvm:kvm_emulate_insn) per vCPU, and the busiest ones per VM
    by their first bytes.  Where kvm_exit never fires (PVM), CR0 writes and real-mode code
    show only here: a guest flipping between real and protected mode is an emulation storm.
    Elsewhere the view is off by default (on a PVM host it costs a program run per emulated
    instruction, ~4.5 per PIO write of a real-mode guest).
Names come from the running kernel's tracepoint formats, never from a built-in table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import kernel, tracefs
from ..hist import Histogram
from ..snapshot import LATENCY_COLUMNS, Metric, TableData, latency_cells, loss_notes
from .base import BaseCollector, Scope, histograms


def possible_cpus() -> int:
    """CPU ids the kernel may run a program on (bpf_get_smp_processor_id() < this)."""
    from bcc.utils import get_possible_cpus
    return max(get_possible_cpus()) + 1

ISA_NAMES = {1: "vmx", 2: "svm"}
VMX_BASIC_MASK = 0xFFFF
#: Exits that end when the guest has work again: their "latency" is guest idle time.
IDLE_REASONS = frozenset({"HLT", "MWAIT_INSTRUCTION", "hlt", "mwait", "idle-halt"})
EINTR = 4
#: The VM filter array (bpf_programs/exits.bpf.c): slot tgid % VM_SLOTS holds the traced tgid,
#: or SLOT_SHARED when several traced tgids share the slot (the traced_tgids hash decides).
VM_SLOTS = 32768
SLOT_SHARED = 0xFFFFFFFF
#: PIO counters per CPU in the pio_slots array (bpf_programs/exits.bpf.c: struct pio_slot).
PIO_SLOTS = 256
#: Exit starts per vCPU thread in the uexit_slots array, slot tid % TID_SLOTS.
TID_SLOTS = 4096
DEFAULT_ALERT_RATE = 10_000.0
PVM_MODULE = "/sys/module/kvm_pvm"
#: Bytes an instruction key keeps (bpf_programs/exits.bpf.c: struct emul_key.insn).
INSN_KEY_BYTES = 4
#: Emulated-instruction rows kept per VM and interval (busiest first): a real-mode guest (SeaBIOS)
#: emulates hundreds of distinct instructions, and a JSON line holding all of them is ~40 KB.
INSN_ROWS = 32
#: A mnemonic hint for a few encodings that explain emulation storms.  Only a hint: legacy
#: prefixes are skipped and the opcode looked up, nothing else is decoded.
PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
ONE_BYTE_HINTS = {0xE4: "in", 0xE5: "in", 0xEC: "in", 0xED: "in",
                  0xE6: "out", 0xE7: "out", 0xEE: "out", 0xEF: "out",
                  0x6C: "ins", 0x6D: "ins", 0x6E: "outs", 0x6F: "outs",
                  0xF4: "hlt", 0xFA: "cli", 0xFB: "sti", 0xCD: "int", 0xCF: "iret"}
TWO_BYTE_HINTS = {0x20: "mov from cr", 0x22: "mov to cr", 0xA2: "cpuid", 0x30: "wrmsr",
                  0x32: "rdmsr"}


@dataclass(frozen=True)
class ReasonNames:
    """Code -> name tables of kvm_exit (VMX, SVM, VMX flag bits) and kvm_userspace_exit."""
    vmx: dict[int, str]
    svm: dict[int, str]
    vmx_flags: dict[int, str]
    userspace: dict[int, str]
    mmio: dict[int, str]
    modes: dict[int, str]         # kvm_emulate_insn flags: real, prot16, ...

    @classmethod
    def from_print_fmts(cls, exit_fmt: str, userspace_fmt: str, mmio_fmt: str,
                        emulate_fmt: str = "") -> "ReasonNames":
        tables = tracefs.symbolic_tables(exit_fmt) + [{}, {}]
        flags = (tracefs.symbolic_tables(exit_fmt, "__print_flags") or [{}])[0]
        users = (tracefs.symbolic_tables(userspace_fmt) or [{}])[0]
        mmio = (tracefs.symbolic_tables(mmio_fmt) or [{}])[0]
        modes = (tracefs.symbolic_tables(emulate_fmt) or [{}])[0]
        # SVM's table writes 0xffffffff as -1; the BPF key is the u32.
        svm = {code & 0xFFFFFFFF: name for code, name in tables[1].items()}
        return cls(tables[0], svm, flags, users, mmio, modes)

    @classmethod
    def from_kernel(cls) -> "ReasonNames":
        def fmt(name: str) -> str:
            if not tracefs.tracepoint_exists("kvm", name):
                return ""
            return tracefs.read_format("kvm", name).print_fmt
        return cls.from_print_fmts(fmt("kvm_exit"), fmt("kvm_userspace_exit"), fmt("kvm_mmio"),
                                   fmt("kvm_emulate_insn"))

    def exit_reason(self, isa: int, code: int) -> tuple[str, list[str]]:
        """(name, flag names) of a kvm_exit reason; a code without a name stays a number."""
        if isa == 1:
            basic, high = code & VMX_BASIC_MASK, code & ~VMX_BASIC_MASK
            flags = [name for bit, name in self.vmx_flags.items() if high & bit]
            unnamed = high & ~sum(self.vmx_flags)
            if unnamed:
                flags.append(hex(unnamed))
            return self.vmx.get(basic, str(basic)), flags
        if isa == 2:
            return self.svm.get(code, hex(code)), []
        return str(code), []

    def userspace_reason(self, code: int) -> str:
        """KVM_EXIT_* name; a negative code is KVM_RUN's errno (-EINTR: 'restart')."""
        if code < 0:
            return "restart" if code == -EINTR else "error"
        return self.userspace.get(code, str(code))

    def mmio_access(self, kind: int) -> str:
        return self.mmio.get(kind, str(kind))

    def cpu_mode(self, flags: int) -> str:
        return self.modes.get(flags, hex(flags))


def insn_bytes(insn: int, length: int) -> bytes:
    """The known first bytes of an instruction key (byte 0 in the low bits of `insn`)."""
    return insn.to_bytes(INSN_KEY_BYTES, "little")[:min(length, INSN_KEY_BYTES)]


def insn_text(insn: int, length: int) -> str:
    """'0f 22 c0'; ' ..' marks bytes the key did not keep."""
    shown = " ".join(f"{b:02x}" for b in insn_bytes(insn, length))
    return shown + (" .." if length > INSN_KEY_BYTES else "")


def insn_hint(data: bytes) -> str:
    """'mov to cr0', 'out', 'cpuid'... for a few encodings, else '' (a hint, not a decoder)."""
    rest = bytes(data)
    while rest and rest[0] in PREFIXES:
        rest = rest[1:]
    if not rest:
        return ""
    if rest[0] != 0x0F:
        return ONE_BYTE_HINTS.get(rest[0], "")
    name = TWO_BYTE_HINTS.get(rest[1], "") if len(rest) > 1 else ""
    if name.endswith(" cr") and len(rest) > 2:
        name += str((rest[2] >> 3) & 7)          # ModRM.reg: the control register
    return name


@dataclass
class ExitRow:
    """One hardware exit reason on one vCPU (kvm_exit)."""
    vm: str
    pid: int
    vcpu: int
    isa: str
    code: int
    reason: str
    flags: list[str]
    idle: bool               # its latency is guest idle time, not handling cost
    count: int
    rate: float
    latency: Histogram       # kvm_exit -> next kvm_entry on the thread, ns


@dataclass
class VmLatency:
    """Exit handling latency of one VM, every vCPU and reason merged."""
    vm: str
    pid: int
    count: int
    latency: Histogram


@dataclass
class UserspaceRow:
    """One KVM_EXIT_* reason on one vCPU thread (kvm_userspace_exit)."""
    vm: str
    pid: int
    vcpu: int | None         # None: the thread is gone or not a known vCPU
    tid: int
    code: int
    reason: str
    count: int
    rate: float
    vmm_time: Histogram      # KVM_RUN returned -> the thread's next ioctl(KVM_RUN), ns


@dataclass
class PioRow:
    vm: str
    pid: int
    port: int
    direction: str           # "in" | "out"
    count: int
    rate: float


@dataclass
class MmioRow:
    vm: str
    pid: int
    gpa: int
    access: str              # "read" | "write" | "unsatisfied-read"
    count: int
    rate: float


@dataclass
class EmulatedRow:
    """Instructions KVM emulated for one vCPU thread (kvm_emulate_insn)."""
    vm: str
    pid: int
    vcpu: int | None
    tid: int
    count: int               # instructions KVM set out to emulate
    failed: int              # of those, the ones it could not emulate (an extra event each)
    rate: float              # count per second


@dataclass
class InsnRow:
    """One emulated instruction encoding on one VM, every vCPU merged."""
    vm: str
    pid: int
    insn: str                # first bytes in hex, e.g. "0f 22 c0"
    length: int              # the instruction's length in bytes
    mode: str                # CPU mode KVM emulated it in: real, prot16, prot32, ...
    hint: str                # mnemonic hint ("mov to cr0", "out"); "" when not in the table
    count: int
    failed: int
    rate: float

    @property
    def what(self) -> str:
        return f"{self.insn} {self.hint}".strip()


@dataclass
class Alert:
    """One reason/port/address on one VM above --alert-rate events per second."""
    vm: str
    pid: int
    view: str                # "exit" | "userspace" | "pio" | "mmio" | "emulated"
    what: str
    rate: float


@dataclass
class Views:
    """Everything the maps say over some span (an interval, or since start)."""
    exits: list[ExitRow]
    userspace: list[UserspaceRow]
    pio: list[PioRow]
    mmio: list[MmioRow]
    emulated: list[EmulatedRow]
    insns: list[InsnRow]


@dataclass
class ExitsSnapshot:
    interval_s: float
    vms: dict[str, int]                  # name -> pid, VMs in scope
    kvm_exit: str                        # since start: "seen" | "not-emitted" | "no-events"
    include_idle: bool
    alert_rate: float
    exits: list[ExitRow]
    exit_latency: list[VmLatency]
    userspace_exits: list[UserspaceRow]
    pio: list[PioRow]
    mmio: list[MmioRow]
    emulated: list[EmulatedRow]          # per vCPU thread
    emulated_insns: list[InsnRow]        # per VM and instruction, the busiest insn_rows per VM
    alerts: list[Alert]
    notes: list[str]
    overflow: int                        # events lost to full maps since start
    missed: int                          # events the kernel kept from the program this interval
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        def per_s(rows) -> str:
            return f"{sum(r.count for r in rows) / self.interval_s:.0f}/s" if self.interval_s else "-"
        text = (f"exits: {len(self.vms)} VM(s) in {self.interval_s:.2f}s: kvm_exit {per_s(self.exits)}, "
                f"to VMM {per_s(self.userspace_exits)}, PIO {per_s(self.pio)}, MMIO {per_s(self.mmio)}, "
                f"emulated {per_s(self.emulated)}")
        return text + (f"  [{len(self.alerts)} ALERT(S)]" if self.alerts else "")

    def tables(self, top: int) -> list[TableData]:
        return [self._exit_table(top), self._latency_table(),
                TableData("exits to the VMM (KVM_RUN returns; VMM time = until the next KVM_RUN)",
                          ["vm", "vcpu", "tid", "reason", "count", "rate/s", *LATENCY_COLUMNS],
                          [[r.vm, _vcpu(r.vcpu), r.tid, r.reason.removeprefix("KVM_EXIT_"),
                            r.count, round(r.rate, 1),
                            *latency_cells(r.vmm_time)] for r in self.userspace_exits[:top]]),
                TableData("PIO ports", ["vm", "port", "dir", "count", "rate/s"],
                          [[r.vm, f"0x{r.port:x}", r.direction, r.count, round(r.rate, 1)]
                           for r in self.pio[:top]]),
                TableData("MMIO addresses", ["vm", "gpa", "access", "count", "rate/s"],
                          [[r.vm, f"0x{r.gpa:x}", r.access, r.count, round(r.rate, 1)]
                           for r in self.mmio[:top]]),
                TableData("instructions emulated by KVM per vCPU (kvm_emulate_insn)",
                          ["vm", "vcpu", "tid", "emulated", "failed", "rate/s"],
                          [[r.vm, _vcpu(r.vcpu), r.tid, r.count, r.failed, round(r.rate, 1)]
                           for r in self.emulated[:top]]),
                TableData("top emulated instructions (first bytes; the mnemonic is a hint)",
                          ["vm", "bytes", "len", "mode", "hint", "count", "failed", "rate/s"],
                          [[r.vm, r.insn, r.length, r.mode, r.hint, r.count, r.failed, round(r.rate, 1)]
                           for r in self.emulated_insns[:top]]),
                TableData(f"rates above {self.alert_rate:g}/s", ["vm", "view", "what", "rate/s"],
                          [[a.vm, a.view, a.what, round(a.rate, 1)] for a in self.alerts])]

    def _exit_table(self, top: int) -> TableData:
        rows = [[r.vm, _vcpu(r.vcpu), r.isa, " ".join([r.reason, *r.flags]) + (" (idle)" if r.idle else ""),
                 r.count, round(r.rate, 1), *latency_cells(r.latency)] for r in self.exits[:top]]
        notes = list(self.notes) + loss_notes(self.overflow, self.missed)
        return TableData("exit reasons (kvm_exit; latency = until the next kvm_entry)",
                         ["vm", "vcpu", "isa", "reason", "count", "rate/s", *LATENCY_COLUMNS], rows, notes)

    def _latency_table(self) -> TableData:
        which = "all exits" if self.include_idle else "idle exits (HLT, MWAIT) excluded"
        notes = [] if self.include_idle else [
            "idle exits measure how long the guest had nothing to do, not handling cost; "
            "they are listed above but left out of this summary (--include-idle to add them)"]
        return TableData(f"exit handling latency per VM ({which})",
                         ["vm", "exits", *LATENCY_COLUMNS],
                         [[r.vm, r.count, *latency_cells(r.latency)] for r in self.exit_latency], notes)

    def metrics(self) -> list[Metric]:
        return self._metrics


def _vcpu(vcpu: int | None) -> str:
    return "-" if vcpu is None else str(vcpu)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 3) if seconds > 0 else 0.0


#: Maps read each interval; emul_counts only with the emulated-instructions view.
MAPS = ("exit_counts", "exit_lat", "vmm_lat", "pio_counts", "mmio_counts")


def vm_slots(tgids, nslots: int = VM_SLOTS) -> dict[int, int]:
    """Filter array content: slot -> the traced tgid owning it, SLOT_SHARED if several do."""
    out: dict[int, int] = {}
    for tgid in tgids:
        slot = tgid % nslots
        out[slot] = SLOT_SHARED if slot in out else tgid
    return out


def exits_of(vmm_lat: dict[tuple, int]) -> dict[tuple, int]:
    """Userspace exits per (tgid, tid, code): the program counts an exit when the VMM is done
    with it, as one sample of the VMM-time histogram (tgid, tid, code, slot)."""
    out: dict[tuple, int] = {}
    for (*key, _slot), n in vmm_lat.items():
        out[tuple(key)] = out.get(tuple(key), 0) + n
    return out


def pio_of(slots: list[tuple[int, int, int]], spill: dict[tuple, int]) -> dict[tuple, int]:
    """PIO counts per (tgid, port, rw): the pio_slots entries (tgid, port | rw << 16, count;
    tgid 0 = free) plus the pio_counts hash (events whose slot another port held)."""
    out = dict(spill)
    for tgid, port_rw, n in slots:
        if tgid and n:
            key = (tgid, port_rw & 0xFFFF, port_rw >> 16)
            out[key] = out.get(key, 0) + n
    return out


@dataclass(frozen=True)
class Slots:
    """Sizes of exits.bpf.c's direct-mapped arrays (tests shrink them to force collisions)."""
    vm: int = VM_SLOTS
    pio: int = PIO_SLOTS        # a power of two
    tid: int = TID_SLOTS


def program_params(filter_tids: bool, emulated: bool, slots: Slots = Slots()) -> dict[str, int]:
    """The -D integers exits.bpf.c is built with."""
    return {"FILTER_TIDS": int(filter_tids), "EMULATED": int(emulated), "NCPUS": possible_cpus(),
            "VM_SLOTS": slots.vm, "PIO_SLOTS": slots.pio, "TID_SLOTS": slots.tid}


def fill_vm_filter(program, tgids, written: dict[int, int], nslots: int = VM_SLOTS) -> dict[int, int]:
    """Make the vm_slots filter array trace `tgids` (and the traced_tgids hash behind it for
    shared slots); `written` is what the previous call wrote, the result is what this one did."""
    program.fill("traced_tgids", {tgid: tgid for tgid in tgids})
    want = vm_slots(tgids, nslots)
    table = program.table("vm_slots")
    for slot in {**written, **want}:
        if written.get(slot) != want.get(slot):
            table[table.Key(slot)] = table.Leaf(want.get(slot, 0))
    return want


def read_maps(program, emulated: bool) -> dict[str, dict[tuple, int]]:
    """Every counter of the program, cumulative, in the shape build_views() takes."""
    maps = {name: program.read(name) for name in MAPS + ("emul_counts",) * emulated}
    maps["uexit_counts"] = exits_of(maps["vmm_lat"])
    maps["pio_counts"] = pio_of([(e.tgid, e.port_rw, e.count) for _, e in
                                 program.read_raw("pio_slots")], maps["pio_counts"])
    maps.setdefault("emul_counts", {})
    return maps


def emulated_default() -> bool:
    """The emulated-instructions view is on by default only where the host emulates guest code
    instead of emitting kvm_exit (PVM)."""
    return kernel.kvm_flavour() == "pvm"


@dataclass
class Labels:
    """Turns the ids in map keys into names (VM by tgid, vCPU index by tid)."""
    names: ReasonNames
    vm_name: dict[int, str]
    vcpu_of: dict[int, int | None]

    def vm(self, tgid: int) -> str:
        return self.vm_name.get(tgid, f"pid-{tgid}")


def build_views(maps: dict[str, dict[tuple, int]], seconds: float, labels: Labels) -> Views:
    """Rows from map contents (deltas or cumulative), busiest first."""
    exit_hists = histograms(maps["exit_lat"])
    exits = []
    for (tgid, vcpu, isa, code), n in maps["exit_counts"].items():
        reason, flags = labels.names.exit_reason(isa, code)
        exits.append(ExitRow(labels.vm(tgid), tgid, vcpu, ISA_NAMES.get(isa, f"isa{isa}"), code,
                             reason, flags, reason in IDLE_REASONS, n, _rate(n, seconds),
                             exit_hists.get((tgid, vcpu, isa, code), Histogram())))
    vmm_hists = histograms(maps["vmm_lat"])
    users = [UserspaceRow(labels.vm(tgid), tgid, labels.vcpu_of.get(tid), tid, code,
                          labels.names.userspace_reason(code), n, _rate(n, seconds),
                          vmm_hists.get((tgid, tid, code), Histogram()))
             for (tgid, tid, code), n in maps["uexit_counts"].items()]
    pio = [PioRow(labels.vm(tgid), tgid, port, "out" if rw else "in", n, _rate(n, seconds))
           for (tgid, port, rw), n in maps["pio_counts"].items()]
    mmio = [MmioRow(labels.vm(tgid), tgid, gpa, labels.names.mmio_access(kind), n, _rate(n, seconds))
            for (tgid, kind, gpa), n in maps["mmio_counts"].items()]
    emulated, insns = emulation_rows(maps["emul_counts"], seconds, labels)
    return Views(*(sorted(rows, key=lambda r: -r.count) for rows in (exits, users, pio, mmio)),
                 emulated, insns)


def emulation_rows(counts: dict[tuple, int], seconds: float,
                   labels: Labels) -> tuple[list[EmulatedRow], list[InsnRow]]:
    """Per-vCPU totals and per-VM instructions from emul_counts rows
    (tgid, tid, insn, len, mode, failed); a failed row counts in `failed` only."""
    threads: dict[tuple, list[int]] = {}
    insns: dict[tuple, list[int]] = {}
    for (tgid, tid, insn, length, mode, failed), n in counts.items():
        threads.setdefault((tgid, tid), [0, 0])[bool(failed)] += n
        insns.setdefault((tgid, insn, length, mode), [0, 0])[bool(failed)] += n
    per_vcpu = [EmulatedRow(labels.vm(tgid), tgid, labels.vcpu_of.get(tid), tid, n, bad,
                            _rate(n, seconds)) for (tgid, tid), (n, bad) in threads.items()]
    per_insn = [InsnRow(labels.vm(tgid), tgid, insn_text(insn, length), length,
                        labels.names.cpu_mode(mode), insn_hint(insn_bytes(insn, length)), n, bad,
                        _rate(n, seconds)) for (tgid, insn, length, mode), (n, bad) in insns.items()]
    return (sorted(per_vcpu, key=lambda r: (-r.count, -r.failed)),
            sorted(per_insn, key=lambda r: (-r.count, -r.failed)))


def busiest_per_vm(rows: list[InsnRow], keep: int) -> list[InsnRow]:
    """The first `keep` rows of each VM (rows sorted busiest first); order kept."""
    seen: dict[int, int] = {}
    out = []
    for row in rows:
        seen[row.pid] = seen.get(row.pid, 0) + 1
        if seen[row.pid] <= keep:
            out.append(row)
    return out


def vm_latencies(exits: list[ExitRow], include_idle: bool) -> list[VmLatency]:
    """Per VM, the handling-latency histograms of its exits merged (idle ones left out by default)."""
    merged: dict[int, VmLatency] = {}
    for row in exits:
        if row.idle and not include_idle:
            continue
        cur = merged.setdefault(row.pid, VmLatency(row.vm, row.pid, 0, Histogram()))
        cur.count += row.count
        cur.latency = cur.latency + row.latency
    return sorted(merged.values(), key=lambda r: -r.count)


def alerts(views: Views, seconds: float, threshold: float) -> list[Alert]:
    """(VM, reason/port/address) pairs whose rate, summed over vCPUs, exceeds the threshold."""
    totals: dict[tuple[int, str, str], tuple[str, int]] = {}

    def add(row, view: str, what: str) -> None:
        vm, n = totals.get((row.pid, view, what), (row.vm, 0))
        totals[(row.pid, view, what)] = (vm, n + row.count)
    for r in views.exits:
        add(r, "exit", r.reason)
    for r in views.userspace:
        add(r, "userspace", r.reason)
    for r in views.pio:
        add(r, "pio", f"port 0x{r.port:x} {r.direction}")
    for r in views.mmio:
        add(r, "mmio", f"gpa 0x{r.gpa:x} {r.access}")
    for r in views.insns:
        add(r, "emulated", r.what)
    out = [Alert(vm, pid, view, what, _rate(n, seconds))
           for (pid, view, what), (vm, n) in totals.items() if _rate(n, seconds) > threshold]
    return sorted(out, key=lambda a: -a.rate)


def kvm_exit_status(cumulative: Views) -> str:
    """Whether kvm_exit fires for the traced VMs: judged on everything counted since start."""
    if cumulative.exits:
        return "seen"
    if cumulative.userspace or cumulative.pio or cumulative.mmio or cumulative.emulated:
        return "not-emitted"
    return "no-events"


def status_notes(status: str, cumulative: Views, pvm: bool) -> list[str]:
    if status != "not-emitted":
        return []
    others = sum(r.count for rows in (cumulative.userspace, cumulative.pio, cumulative.mmio,
                                      cumulative.emulated) for r in rows)
    why = " (a PVM host: /sys/module/kvm_pvm is loaded)" if pvm else ""
    return [f"no exit reasons: this kernel does not emit kvm:kvm_exit{why}; {others} exits to the "
            "VMM, PIO/MMIO accesses and emulated instructions were counted for the same VMs, but "
            "exits KVM completes without its instruction emulator or the VMM (e.g. interrupts, "
            "page faults) show in no view"]


def metrics_of(views: Views) -> list[Metric]:
    """Cumulative Prometheus samples: counters per reason/port/address, latency histograms."""
    out: list[Metric] = []
    for r in views.exits:
        labels = {"vm": r.vm, "vcpu": str(r.vcpu), "isa": r.isa, "reason": r.reason}
        out.append(Metric("kvmbpf_exits_total", "counter", "kvm_exit events", labels, r.count))
        out.append(Metric("kvmbpf_exit_latency_seconds", "histogram",
                          "kvm_exit to the next kvm_entry", labels, hist=r.latency, scale=1e-9))
    for r in views.userspace:
        labels = {"vm": r.vm, "vcpu": _vcpu(r.vcpu), "reason": r.reason}
        out.append(Metric("kvmbpf_userspace_exits_total", "counter", "KVM_RUN returns to the VMM",
                          labels, r.count))
        out.append(Metric("kvmbpf_vmm_time_seconds", "histogram",
                          "KVM_RUN return to the next KVM_RUN", labels, hist=r.vmm_time, scale=1e-9))
    out += [Metric("kvmbpf_pio_total", "counter", "kvm_pio events",
                   {"vm": r.vm, "port": f"0x{r.port:x}", "direction": r.direction}, r.count)
            for r in views.pio]
    out += [Metric("kvmbpf_mmio_total", "counter", "kvm_mmio events",
                   {"vm": r.vm, "gpa": f"0x{r.gpa:x}", "access": r.access}, r.count)
            for r in views.mmio]
    for r in views.emulated:
        labels = {"vm": r.vm, "vcpu": _vcpu(r.vcpu)}
        out.append(Metric("kvmbpf_emulated_insns_total", "counter",
                          "instructions KVM emulated (kvm_emulate_insn)", labels, r.count))
        out.append(Metric("kvmbpf_emulation_failures_total", "counter",
                          "instructions KVM failed to emulate", labels, r.failed))
    return out


class ExitsCollector(BaseCollector):
    """kvmbpf exits: exit reasons, exits to the VMM, PIO, MMIO and emulated instructions per VM and vCPU."""

    program_name = "exits"

    def __init__(self, scope: Scope, include_idle: bool = False,
                 alert_rate: float = DEFAULT_ALERT_RATE, insn_rows: int = INSN_ROWS,
                 emulated: bool | None = None, slots: Slots = Slots()):
        self.names = ReasonNames.from_kernel()
        self.include_idle = include_idle
        self.alert_rate = alert_rate
        self.insn_rows = insn_rows
        self.emulated = emulated_default() if emulated is None else emulated
        self.vcpu_of: dict[int, int | None] = {}      # tid -> vCPU index, every thread seen
        self.sizes = slots
        self.slots: dict[int, int] = {}               # vm_slots content written so far
        super().__init__(scope, program_params(bool(scope.vcpus), self.emulated, slots))

    def update_filters(self) -> None:
        """VMs (and with --vcpu, vCPU threads) in; exit starts of threads no longer traced out."""
        self.slots = fill_vm_filter(self.program, self.scope.tgids(), self.slots, self.sizes.vm)
        if self.scope.vcpus:
            self.program.fill("traced_tids", self.scope.vcpu_tids())
        tids = self.scope.all_tids()
        for name in ("exit_start", "uexit_start"):
            starts = self.program.table(name)
            for key in [k for k in starts.keys() if k.value not in tids]:
                starts.pop(key, None)
        slots = self.program.table("uexit_slots")
        for key, start in self.program.read_raw("uexit_slots"):
            if start.tid and start.tid not in tids:
                slots[key] = slots.Leaf()

    def _labels(self) -> Labels:
        self.vcpu_of.update({t.tid: t.vcpu for vm in self.scope.inv.vms for t in vm.vcpus})
        names = {vm.pid: vm.name for vm in self.scope.inv.vms}
        return Labels(self.names, {**self.scope.gone, **names}, self.vcpu_of)

    def snapshot(self) -> ExitsSnapshot:
        self.refresh()
        elapsed = self.interval.tick()
        current = read_maps(self.program, self.emulated)
        deltas = {name: self.interval.counts(name, rows) for name, rows in current.items()}
        labels = self._labels()
        views = build_views(deltas, elapsed, labels)
        since_start = build_views(current, self.interval.last_time - self.interval.start_time, labels)
        status = kvm_exit_status(since_start)
        missed = self.missed()
        return ExitsSnapshot(
            interval_s=round(elapsed, 3), vms={vm.name: vm.pid for vm in self.scope.vms},
            kvm_exit=status, include_idle=self.include_idle, alert_rate=self.alert_rate,
            exits=views.exits, exit_latency=vm_latencies(views.exits, self.include_idle),
            userspace_exits=views.userspace, pio=views.pio, mmio=views.mmio,
            emulated=views.emulated, emulated_insns=busiest_per_vm(views.insns, self.insn_rows),
            alerts=alerts(views, elapsed, self.alert_rate),
            notes=status_notes(status, since_start, os.path.isdir(PVM_MODULE)) + self._view_notes(),
            overflow=self.overflow(), missed=missed,
            _metrics=metrics_of(since_start))

    def _view_notes(self) -> list[str]:
        return [] if self.emulated else [
            "emulated instructions not traced (--emulated to add them; on by default on PVM hosts)"]
