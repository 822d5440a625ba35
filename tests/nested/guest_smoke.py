#!/usr/bin/env python3
"""Runs INSIDE the nested lab guest (see test_nested_smoke.py).

Prints one JSON document with what it found:
  dev_kvm      /dev/kvm present
  npt          kvm_amd's npt parameter
  hist         {"baseline"|"main": {"exit_reason (int)": hits}} from a tracefs
               hist trigger on kvm:kvm_exit around vmm.py runs
  vmm          the vmm.py summaries for those runs
  kprobe       result of adding/removing a kprobe through kprobe_events
  bcc          compile time and per-exit-reason counts of a tiny
               TRACEPOINT_PROBE(kvm, kvm_exit) program (if --bcc)
Usage: guest_smoke.py --io N --cpuid M --mmio K [--bcc]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

T = "/sys/kernel/tracing"
HERE = os.path.dirname(os.path.abspath(__file__))
VMM = os.path.join(HERE, "vmm.py")
TRIGGER = os.path.join(T, "events/kvm/kvm_exit/trigger")
HIST = os.path.join(T, "events/kvm/kvm_exit/hist")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def run_vmm(io, cpuid, mmio, extra=()):
    out = subprocess.run([sys.executable, VMM, "--io", str(io), "--cpuid", str(cpuid),
                          "--mmio", str(mmio), *extra],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def hist_around(io, cpuid, mmio):
    """Count kvm_exit per exit_reason with a hist trigger while vmm.py runs."""
    write(TRIGGER, "hist:keys=exit_reason")
    try:
        summary = run_vmm(io, cpuid, mmio)
        text = open(HIST).read()
    finally:
        write(TRIGGER, "!hist:keys=exit_reason")
    counts = {}
    for m in re.finditer(r"\{ exit_reason:\s+(\d+) \} hitcount:\s+(\d+)", text):
        counts[m.group(1)] = int(m.group(2))
    return counts, summary


def append(path, line):
    # not open(path, "a"): Python seeks to the end on open, which
    # kprobe_events refuses with EINVAL
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def kprobe_check():
    ev = os.path.join(T, "kprobe_events")
    res = {"kprobe_events": os.path.exists(ev)}
    try:
        append(ev, "p:kvmbpf_smoke kvm_vcpu_ioctl\n")
        res["created"] = os.path.isdir(os.path.join(T, "events/kprobes/kvmbpf_smoke"))
        append(ev, "-:kvmbpf_smoke\n")
        res["removed"] = not os.path.exists(os.path.join(T, "events/kprobes/kvmbpf_smoke"))
    except OSError as e:
        res["error"] = str(e)
    return res


BCC_PROG = r"""
BPF_HASH(exits, u32, u64);
TRACEPOINT_PROBE(kvm, kvm_exit) {
    u32 reason = args->exit_reason;
    exits.increment(reason);
    return 0;
}
"""


def bcc_check(io, cpuid, mmio):
    from bcc import BPF
    t0 = time.monotonic()
    b = BPF(text=BCC_PROG)
    compile_s = time.monotonic() - t0
    summary = run_vmm(io, cpuid, mmio)
    counts = {str(k.value): v.value for k, v in b["exits"].items()}
    b.cleanup()
    return {"compile_seconds": round(compile_s, 2), "counts": counts, "vmm": summary}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--io", type=int, required=True)
    ap.add_argument("--cpuid", type=int, required=True)
    ap.add_argument("--mmio", type=int, required=True)
    ap.add_argument("--bcc", action="store_true")
    a = ap.parse_args()
    out = {"dev_kvm": os.path.exists("/dev/kvm"), "uname": os.uname().release}
    try:
        out["npt"] = open("/sys/module/kvm_amd/parameters/npt").read().strip()
    except OSError:
        out["npt"] = None
    if out["dev_kvm"]:
        base, base_vmm = hist_around(0, 0, 0)
        main_h, main_vmm = hist_around(a.io, a.cpuid, a.mmio)
        out["hist"] = {"baseline": base, "main": main_h}
        out["vmm"] = {"baseline": base_vmm, "main": main_vmm}
    out["kprobe"] = kprobe_check()
    if a.bcc and out["dev_kvm"]:
        try:
            out["bcc"] = bcc_check(a.io, a.cpuid, a.mmio)
        except Exception as e:
            out["bcc"] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
