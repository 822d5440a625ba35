"""kvmbpf qemu on real lab guests, checked against bpftrace and the guest's known workload.

Ground truth: the `quiet` guest spins with no exits, then does PIO_COUNT port
writes and MMIO_COUNT MMIO writes and prints three marker lines on COM1 (one
port write per byte), then halts.  QEMU dispatches each of those writes in
userspace with exactly one memory_region_dispatch_write call on the vCPU thread.
"""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_kvmbpf, unique

QEMU = "/usr/bin/qemu-system-x86_64"
FUNC = "memory_region_dispatch_write"
MARKER_BYTES = len("KVMBPF:begin\n") + len("KVMBPF:end\n") + len("KVMBPF:done\n")


def our_uprobe_programs() -> set[int]:
    """Loaded uprobe programs of kvmbpf qemu (uprobes load as kprobe-type programs)."""
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True).stdout
    return {p["id"] for p in json.loads(out or "[]") if p.get("type") == "kprobe"
            and p.get("name", "").startswith(("on_entry_", "on_return_"))}


def start_bpftrace(pid: int) -> subprocess.Popen:
    """An independent counter of the same uprobe in the same process; prints 'tick' once attached."""
    prog = (f"uprobe:{QEMU}:{FUNC} /pid == {pid}/ {{ @calls = count(); }} "
            "interval:ms:200 { printf(\"tick\\n\"); }")
    return subprocess.Popen(["bpftrace", "-e", prog], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def wait_line(proc: subprocess.Popen, want, timeout: float = 60) -> list[str]:
    """Read stdout lines until want(line) holds (the process must keep printing)."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended early: {lines[-5:]}")
        lines.append(line)
        if want(line):
            return lines
    raise AssertionError(f"no expected line within {timeout}s")


@pytest.mark.skipif(shutil.which("bpftrace") is None, reason="needs bpftrace (the ground truth)")
def test_counts_equal_bpftrace_and_the_guest_workload_on_vcpu0(lab, no_leaked_probes):
    name = unique("q")
    pio, mmio = 300, 700
    vm = lab.start_vm(name, "quiet", {"PIO_COUNT": pio, "MMIO_COUNT": mmio, "SPIN_COUNT": 24})
    vm.wait_for("ready")
    bt = start_bpftrace(vm.pid)
    ours = subprocess.Popen([sys.executable, "-m", "kvmbpf", "qemu", "trace", FUNC, "--vm", name,
                             "--latency", "--json", "0.5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_line(bt, lambda line: line.startswith("tick"))
        lines = wait_line(ours, lambda line: line.startswith("{"))   # attached, past the rate guard
        assert "begin" not in vm.markers(), "the guest's quiet spin ended before both tracers attached"
        assert len(our_uprobe_programs()) == 2          # on_entry_0 + on_return_0 (--latency)
        vm.wait_for("done", timeout=120)
        time.sleep(1.0)                       # the guest halts: nothing more to count
        ours.send_signal(signal.SIGINT)
        out, err = ours.communicate(timeout=30)
        bt.send_signal(signal.SIGINT)
        bt_out, _ = bt.communicate(timeout=30)
    finally:
        for proc in (ours, bt):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert ours.returncode in (0, 130), err
    snaps = [json.loads(line) for line in lines + out.splitlines() if line.startswith("{")]
    truth = int(bt_out.split("@calls:")[1].split()[0])
    rows = [r for s in snaps for r in s["threads"] if r["vm"] == name and r["function"] == FUNC]
    assert {r["thread"] for r in rows} == {"vcpu0"}
    calls = sum(r["calls"] for r in rows)
    timed = sum(r["latency"]["count"] for r in rows)
    assert calls == truth == pio + mmio + MARKER_BYTES
    assert timed == calls                     # every call returned and was timed
    assert all(s["overflow"] == 0 for s in snaps)


def test_rate_guard_refuses_a_hot_function_and_force_overrides(lab, no_leaked_probes):
    name = unique("q")
    vm = lab.start_vm(name, "exits", {"PIO_COUNT": 2000, "MMIO_COUNT": 200, "DELAY_MS": 50,
                                      "ROUNDS": 0})
    vm.wait_for("begin", 2)
    refused = run_kvmbpf("qemu", "trace", FUNC, "--vm", name, "--max-rate", "200", "-d", "3")
    assert refused.rc == 2, refused.err
    assert len(refused.err.strip().splitlines()) == 1 and "Traceback" not in refused.err
    assert FUNC in refused.err and "--force" in refused.err and "times/s" in refused.err
    forced = run_kvmbpf("qemu", "trace", FUNC, "--vm", name, "--max-rate", "200", "--force",
                        "-d", "2", "--json")
    assert forced.rc == 0, forced.err
    [snap] = forced.json_lines()
    rows = [r for r in snap["threads"] if r["vm"] == name]
    # each round is 2,000 + 200 dispatched writes plus two marker lines: far above 200/s
    assert rows and rows[0]["thread"] == "vcpu0" and rows[0]["calls"] > 2200


def test_probes_of_a_vm_match_the_binary_it_runs(lab):
    name = unique("q")
    vm = lab.start_vm(name, "exits", {"ROUNDS": 1})
    vm.wait_for("done")
    res = run_kvmbpf("qemu", "probes", "--vm", name, "--grep", "^kvm_cpu_exec$", "--json", check=True)
    data = json.loads(res.out)
    readelf = subprocess.run(["readelf", "-W", "--dyn-syms", QEMU], capture_output=True, text=True).stdout
    addr = [int(line.split()[1], 16) for line in readelf.splitlines() if line.endswith(" kvm_cpu_exec")]
    assert data["binary"] == QEMU and [(f["name"], f["addr"]) for f in data["functions"]] == [
        ("kvm_cpu_exec", addr[0])]


def test_bad_input_is_one_line_and_exit_2(lab, no_leaked_probes):
    name = unique("q")
    lab.start_vm(name, "exits", {"ROUNDS": 1}).wait_for("done")
    for args in (["trace", "memory_region_dispatch_writ", "--vm", name],
                 ["trace", FUNC, "--vm", "no-such-vm-here"],
                 ["trace", "--set", "disk", "--vm", name],
                 ["trace", "--vm", name],
                 ["trace", FUNC, "--vm", name, "--max-rate", "0"],
                 ["trace", FUNC, "--vm", name, "--vcpu", "0"],
                 ["probes", "/no/such/binary"],
                 ["probes", "--grep", "(", QEMU]):
        res = run_kvmbpf("qemu", *args)
        assert res.rc == 2, (args, res.rc, res.err)
        assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err, (args, res.err)
