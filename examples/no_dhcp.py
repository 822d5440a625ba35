#!/usr/bin/env python3
""""My VM cannot connect to the internet": nobody answers its DHCP requests.

The lab network's DHCP server (dnsmasq, in the lab's own network namespace) is stopped, as
if it had crashed.  The lab guest brings up its virtio-net NIC and asks for an address:
three DHCPDISCOVERs, about 6 s apart, then it gives up.

`kvmbpf net` counts the frames on the VM's tap both ways (rx = from the guest, tx = to the
guest) and the packets the host drops, with the kernel's drop reason: DISCOVERs leaving the
guest with nothing coming back means the guest's NIC works and the host side is silent.

Run as root: .venv/bin/python examples/no_dhcp.py
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

from example_kit import (Around, Diagnosis, around_command, kvmbpf_command, main, new_lab, say,
                         vm_name)

from kvmbpf.lab.network import LabNetwork, ether_frame
from kvmbpf.lab.vm import LabVM

GUEST_MAC = "52:54:00:12:34:56"
GO_ETHERTYPE = 0x88B5          # the frame the lab guest waits for before it starts DHCP
SECONDS = 24                   # three DISCOVERs ~6 s apart, then "dhcp-failed"


@dataclass
class Scenario:
    vm: LabVM
    net: LabNetwork


def trace(name: str, start) -> list[dict]:
    """`kvmbpf net --vm NAME 1 -d SECONDS --json` in the background: `start()` runs once its
    first interval is out (the probes are attached); every interval is returned."""
    args = ["net", "--vm", name, "1", "-d", str(SECONDS), "--json"]
    say(f"$ kvmbpf {' '.join(args)}")
    proc = subprocess.Popen(kvmbpf_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()
        if not first:
            raise RuntimeError(f"kvmbpf net failed: {proc.stderr.read().strip()}")
        start()
        out, err = proc.communicate(timeout=SECONDS + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"kvmbpf net failed ({proc.returncode}): {err.strip()}")
    return [json.loads(line) for line in [first, *out.splitlines()] if line.startswith("{")]


def run(around: Around = None) -> Diagnosis:
    with new_lab() as lab:
        net = lab.network()
        net.stop_dnsmasq()
        say("stopped the lab network's DHCP server (dnsmasq)")
        name = vm_name("dhcp")
        vm = lab.start_vm(name, "net", {"GO_WAIT": 1}, net=net, mac=GUEST_MAC)
        say(f"started lab guest {name} on tap {vm.tap}: it asks for an address once told to go")

        def go() -> None:
            net.send_frames(net.bridge, ether_frame(GUEST_MAC, net.mac(net.bridge), GO_ETHERTYPE, 60))
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline and "dhcp-failed" not in vm.markers():
                time.sleep(0.2)
        with around_command(around, Scenario(vm, net)):
            lines = trace(name, go)
    return diagnose(lines, name, vm.tap)


def diagnose(lines: list[dict], name: str, tap: str) -> Diagnosis:
    def total(key: str) -> int:
        return sum(d[key] for line in lines for d in line["devices"] if d["dev"] == tap)
    drops: dict[tuple[str, str], int] = {}
    for line in lines:
        for d in line["drops"]:
            if d["vm"] == name:
                drops[(d["reason"], d["location"])] = drops.get((d["reason"], d["location"]), 0) + d["count"]
    sent, received = total("rx_packets"), total("tx_packets")
    evidence = {
        "vm": name, "tap": tap, "seconds": round(sum(line["interval_s"] for line in lines), 1),
        "from_guest_frames": sent, "from_guest_bytes": total("rx_bytes"),
        "to_guest_frames": received, "to_guest_bytes": total("tx_bytes"),
        "drops": {f"{reason} at {where}": n for (reason, where), n in drops.items()},
    }
    # One frame to the guest is ours: the "go" that starts its DHCP.
    answered = received - 1
    evidence["answers_to_guest"] = answered
    found = sent > 0 and answered == 0
    if not found:
        return Diagnosis(False, f"{name} sent {sent} frames and got {answered} back: the host "
                                "side answers", evidence)
    dropped = ", ".join(f"{n} x {key}" for key, n in evidence["drops"].items())
    summary = (f"{name} sent {sent} frames of {evidence['from_guest_bytes'] // sent} bytes (a DHCP "
               f"DISCOVER's size) in {evidence['seconds']:.0f}s and got nothing back "
               f"(to-guest frames: {received}, the one that started it). Its NIC and tap work; "
               "no DHCP server answered on the bridge.")
    if dropped:
        summary += f" The host dropped them: {dropped} (nothing listens on the DHCP port)."
    summary += " Check the DHCP server (here: dnsmasq was stopped)."
    return Diagnosis(True, summary, evidence)


if __name__ == "__main__":
    raise SystemExit(main(run, "Why can my VM not connect to the internet?"))
