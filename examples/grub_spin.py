#!/usr/bin/env python3
""""100 % CPU while sitting at the GRUB menu": a guest that exits far too often.

A boot loader waiting at its menu can switch between real and protected mode as fast as it
can (each round trip: two CR0 writes).  The lab guest does exactly that ("modeswitch"
workload): rounds of 20,000 round trips, forever, nothing else.

`kvmbpf exits` flags any exit reason, port, address or emulated instruction above 10,000/s
on one VM:
  - on a VMX/SVM host, kvm_exit shows the CR0 writes themselves (CR_ACCESS / write_cr0);
  - on a PVM host (no kvm_exit) KVM emulates the guest's real-mode code instruction by
    instruction: the CR0 writes show in the emulated-instructions view as `0f 22 c0`
    (`mov cr0, eax`, hint "mov to cr0"), once in real and once in 16-bit protected mode.

Run as root: .venv/bin/python examples/grub_spin.py
"""
from __future__ import annotations

from dataclasses import dataclass

from example_kit import Around, Diagnosis, around_command, kvmbpf_json, main, new_lab, say, vm_name

from kvmbpf.lab.lab import WORKLOADS
from kvmbpf.lab.vm import LabVM

PARAMS = WORKLOADS["modeswitch"][1]
CR0_COUNT = PARAMS["CR0_COUNT"]        # round trips per round: 2 CR0 writes each
SERIAL_PORT = 0x3F8
ALERT_RATE = 10_000.0
SECONDS = 4

WHY = {
    "exit": "the vCPU leaves the guest for this reason",
    "userspace": "each one is a round trip from the vCPU to QEMU",
    "pio": "the guest writes this I/O port",
    "mmio": "the guest touches this device address",
    "emulated": "KVM emulates this guest instruction in the kernel, one at a time",
}


@dataclass
class Scenario:
    vm: LabVM


def run(around: Around = None) -> Diagnosis:
    with new_lab() as lab:
        name = vm_name("grub")
        say(f"starting lab guest {name}: real <-> protected mode switches, forever")
        vm = lab.start_vm(name, "exits", PARAMS)
        vm.wait_for("end")
        with around_command(around, Scenario(vm)):
            (snap,) = kvmbpf_json("exits", "--vm", name, "-d", str(SECONDS),
                                  "--alert-rate", f"{ALERT_RATE:g}")
    return diagnose(snap, name)


def port_count(snap: dict, port: int) -> int:
    return sum(r["count"] for r in snap["pio"] if r["port"] == port and r["direction"] == "out")


def diagnose(snap: dict, name: str) -> Diagnosis:
    alerts = [a for a in snap["alerts"] if a["vm"] == name]
    evidence = {
        "vm": name, "interval_s": snap["interval_s"], "alert_rate": snap["alert_rate"],
        "kvm_exit": snap["kvm_exit"],
        "alerts": [f"{a['view']}: {a['what']} {a['rate']:.0f}/s" for a in alerts],
        "serial_bytes": port_count(snap, SERIAL_PORT),
        "cr0_exits": sum(r["count"] for r in snap["exits"] if "CR" in r["reason"].upper()),
        "cr0_writes_emulated": sum(r["count"] for r in snap["emulated_insns"]
                                   if r["vm"] == name and r["hint"] == "mov to cr0"),
        "emulated": sum(r["count"] for r in snap["emulated"] if r["vm"] == name),
    }
    if not alerts:
        return Diagnosis(False, f"no reason, port or address of {name} above "
                                f"{ALERT_RATE:g}/s in {snap['interval_s']:.1f}s", evidence)
    top = alerts[0]
    evidence["flagged"] = top
    lines = [f"{name} makes KVM do one thing {top['rate']:.0f} times a second: {top['view']} "
             f"'{top['what']}' ({WHY[top['view']]}), above the {ALERT_RATE:g}/s flag."]
    if snap["kvm_exit"] == "seen":
        lines.append(f"kvm_exit is traced here: {evidence['cr0_exits']} of the exits are CR "
                     "accesses, the mode switches themselves.")
    else:
        lines.append("This host emits no kvm_exit (PVM): KVM emulates the guest's real-mode code "
                     f"instruction by instruction, {evidence['emulated']} instructions in "
                     f"{snap['interval_s']:.1f}s, {evidence['cr0_writes_emulated']} of them CR0 "
                     "writes (mov to cr0): the mode switches themselves.")
    lines.append("A guest waiting for a key press should halt between timer interrupts and "
                 "exit rarely: this one keeps a host CPU busy doing nothing useful (fix it in the "
                 "guest: GRUB's timeout, or a boot loader that halts while it waits).")
    return Diagnosis(True, " ".join(lines), evidence)


if __name__ == "__main__":
    raise SystemExit(main(run, "Why does this VM use 100 % CPU while sitting at the GRUB menu?"))
