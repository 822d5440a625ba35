#!/usr/bin/env python3
""""100 % CPU while sitting at the GRUB menu": a guest that exits far too often.

A boot loader waiting at its menu can switch between real and protected mode as fast as it
can (each switch: two CR0 writes) and poll a device port in between.  The lab guest does
exactly that: per round 20,000 mode switches and 20,000 writes to port 0x700, forever.

`kvmbpf exits` flags any exit reason, port or address above 10,000/s on one VM:
  - on a VMX/SVM host, kvm_exit shows the CR0 writes themselves (CR_ACCESS / write_cr0)
    and the port writes (IO_INSTRUCTION / io);
  - on a PVM host (no kvm_exit) the CR0 writes are emulated inside KVM and reach no
    tracepoint kvmbpf exits reads, but the port writes do: every one is a kvm_pio event and
    an exit to QEMU (KVM_EXIT_IO), flagged in the `pio` and `userspace` views.

Run as root: .venv/bin/python examples/grub_spin.py
"""
from __future__ import annotations

from dataclasses import dataclass

from example_kit import Around, Diagnosis, around_command, kvmbpf_json, main, new_lab, say, vm_name

from kvmbpf.lab.lab import WORKLOADS
from kvmbpf.lab.vm import LabVM

PORT = 0x700
PIO_COUNT = 20_000
#: The "modeswitch" lab workload, plus a port polled each round (visible on every host).
PARAMS = {**WORKLOADS["modeswitch"][1], "PIO_PORT": PORT, "PIO_COUNT": PIO_COUNT}
SERIAL_PORT = 0x3F8
ALERT_RATE = 10_000.0
SECONDS = 4

WHY = {
    "exit": "the vCPU leaves the guest for this reason",
    "userspace": "each one is a round trip from the vCPU to QEMU",
    "pio": "the guest writes this I/O port",
    "mmio": "the guest touches this device address",
}


@dataclass
class Scenario:
    vm: LabVM


def run(around: Around = None) -> Diagnosis:
    with new_lab() as lab:
        name = vm_name("grub")
        say(f"starting lab guest {name}: mode switches and port 0x{PORT:x} writes, forever")
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
        "port_0x700_writes": port_count(snap, PORT),
        "serial_bytes": port_count(snap, SERIAL_PORT),
        "cr0_exits": sum(r["count"] for r in snap["exits"] if "CR" in r["reason"].upper()),
    }
    if not alerts:
        return Diagnosis(False, f"no reason, port or address of {name} above "
                                f"{ALERT_RATE:g}/s in {snap['interval_s']:.1f}s", evidence)
    top = alerts[0]
    evidence["flagged"] = top
    lines = [f"{name} exits {top['rate']:.0f} times a second for one thing: {top['view']} "
             f"'{top['what']}' ({WHY[top['view']]}), above the {ALERT_RATE:g}/s flag."]
    if snap["kvm_exit"] == "seen":
        lines.append(f"kvm_exit is traced here: {evidence['cr0_exits']} of the exits are CR "
                     "accesses, the mode switches themselves.")
    else:
        lines.append("This host emits no kvm_exit (PVM): the CR0 writes of the mode switches are "
                     "emulated inside KVM and do not show, but the port writes between them do, "
                     f"{evidence['port_0x700_writes']} to port 0x{PORT:x} in "
                     f"{snap['interval_s']:.1f}s, each a trip to QEMU.")
    lines.append("A guest idling at a menu should exit a few hundred times a second: this one "
                 "keeps a host CPU busy doing nothing useful (fix it in the guest: GRUB's "
                 "terminal/timeout settings, or a boot loader that halts while it waits).")
    return Diagnosis(True, " ".join(lines), evidence)


if __name__ == "__main__":
    raise SystemExit(main(run, "Why does this VM use 100 % CPU while sitting at the GRUB menu?"))
