#!/usr/bin/env python3
""""Is my cloud guest getting enough CPU?": a vCPU that waits for its host CPU.

A lab guest whose vCPU never stops computing is pinned to one host CPU together with a CPU
hog (`yes > /dev/null`, a busy neighbour: the two get about half the CPU each).  Inside
the guest this shows up as steal time; on the host, `kvmbpf steal` measures how long the vCPU
thread sat runnable but not running, and which task held the CPU meanwhile.

Run as root: .venv/bin/python examples/noisy_neighbour.py
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass

from example_kit import Around, Diagnosis, around_command, kvmbpf_json, main, new_lab, say, vm_name

from kvmbpf import inventory
from kvmbpf.lab.lab import WORKLOADS
from kvmbpf.lab.vm import LabVM

SECONDS = 4
STEAL_FLAG = 20.0       # % of the interval a vCPU waited: more than a guest should lose
HOG_SHARE = 20.0        # % of that wait the neighbour held the CPU: a main culprit


@dataclass
class Scenario:
    vm: LabVM
    vcpu_tid: int
    hog_pid: int
    cpu: int


def vcpu0_tid(pid: int) -> int:
    (vm,) = [vm for vm in inventory.scan().vms if vm.pid == pid]
    return next(t.tid for t in vm.vcpus if t.vcpu == 0)


@contextlib.contextmanager
def hog_on(cpu: int):
    """`yes > /dev/null` pinned to `cpu`: the noisy neighbour (killed by pid on exit)."""
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        yield hog.pid
    finally:
        hog.kill()
        hog.wait()


def run(around: Around = None) -> Diagnosis:
    cpu = min(os.sched_getaffinity(0))
    with new_lab() as lab:
        name = vm_name("busy")
        say(f"starting lab guest {name}: its vCPU computes without a break")
        vm = lab.start_vm(name, *WORKLOADS["spin"])
        vm.wait_for("done")
        tid = vcpu0_tid(vm.pid)
        os.sched_setaffinity(tid, {cpu})
        with hog_on(cpu) as hog:
            say(f"pinned vCPU 0 (tid {tid}) and a CPU hog `yes` (pid {hog}) to host CPU {cpu}")
            with around_command(around, Scenario(vm, tid, hog, cpu)):
                (snap,) = kvmbpf_json("steal", "--vm", name, "-d", str(SECONDS))
    return diagnose(snap, name, hog)


def label(culprit: dict) -> str:
    """As `kvmbpf steal` prints it: another VM's vCPU by name, any other task as comm[pid]."""
    if culprit["vm"] is not None:
        return f"{culprit['vm']}/vcpu{culprit['vcpu']}"
    return f"{culprit['comm']}[{culprit['pid']}]"


def diagnose(snap: dict, name: str, hog: int) -> Diagnosis:
    (vm,) = [v for v in snap["vms"] if v["name"] == name]
    (vcpu,) = vm["vcpus"]
    wait = vcpu["wait_ns"]
    shares = {label(c): round(100 * c["wait_ns"] / wait, 1) for c in vcpu["culprits"][:3]} if wait else {}
    hog_ns = sum(c["wait_ns"] for c in vcpu["culprits"] if c["tid"] == hog)
    evidence = {
        "vm": name, "interval_s": snap["interval_s"], "vcpu_tid": vcpu["tid"],
        "steal_pct": round(vcpu["steal_pct"], 1), "wait_ns": wait, "waits": vcpu["waits"],
        "top_culprits_pct": shares, "hog_pid": hog, "hog_wait_ns": hog_ns,
        "hog_share_pct": round(100 * hog_ns / wait, 1) if wait else 0.0,
    }
    held = ", ".join(f"{who} {pct:.0f} %" for who, pct in shares.items())
    found = vcpu["steal_pct"] >= STEAL_FLAG and evidence["hog_share_pct"] >= HOG_SHARE
    if not found:
        return Diagnosis(False, f"{name}'s vCPU waited {vcpu['steal_pct']:.1f} % of the time; "
                                f"held by: {held or 'nobody'} (the hog is yes[{hog}])", evidence)
    summary = (f"No: {name}'s vCPU 0 waited for its host CPU {vcpu['steal_pct']:.0f} % of "
               f"{snap['interval_s']:.1f}s ({vcpu['waits']} waits, {wait / 1e9:.2f}s; the guest "
               f"sees this as steal time).  Who held the CPU meanwhile: {held}; the neighbour "
               f"yes[{hog}] alone {evidence['hog_share_pct']:.0f} % of the wait.  Move the "
               "neighbour, or the vCPU, to another host CPU.")
    return Diagnosis(True, summary, evidence)


if __name__ == "__main__":
    raise SystemExit(main(run, "Is my cloud guest getting enough CPU?"))
