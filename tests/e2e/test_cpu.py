"""`kvmbpf cpu` against /proc read directly: a spinning lab vCPU is always running or waiting."""
from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import run_kvmbpf, unique
from kvmbpf.collectors.base import Scope
from kvmbpf.collectors.cpu import CpuCollector
from .test_steal import spinning_vm

TICK = 1e9 / os.sysconf("SC_CLK_TCK")


def proc_times(pid: int) -> tuple[int, int, int]:
    """(utime, stime, guest_time) ticks of the whole process, from /proc/<pid>/stat."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12]), int(f[40])


def test_vm_times_match_proc_and_a_spinning_vcpu_fills_one_cpu(lab):
    name = unique("cp")
    vm, tid = spinning_vm(lab, name)
    collector = CpuCollector(Scope((name,)))
    before = proc_times(vm.pid)
    collector.snapshot()
    after0 = proc_times(vm.pid)
    time.sleep(3)
    before1 = proc_times(vm.pid)
    snap = collector.snapshot()
    after = proc_times(vm.pid)
    collector.close()
    (row,) = [v for v in snap.vms if v.name == name]
    secs = snap.interval_s

    def within(pct: float, low_ticks: int, high_ticks: int) -> None:
        ns = pct / 100 * secs * 1e9
        assert low_ticks * TICK - 0.002e9 <= ns <= high_ticks * TICK + 0.002e9, (pct, low_ticks, high_ticks)
    lo = [b - a for a, b in zip(after0, before1)]
    hi = [b - a for a, b in zip(before, after)]
    within(row.cpu.guest_pct, lo[2], hi[2])
    within(row.cpu.user_pct, lo[0] - hi[2], hi[0] - lo[2])
    within(row.cpu.system_pct, lo[1], hi[1])
    (vcpu,) = row.vcpus
    assert vcpu.tid == tid
    busy = vcpu.cpu.guest_pct + vcpu.cpu.user_pct + vcpu.cpu.system_pct
    # never sleeps: running (ticks) + waiting (schedstat) = the whole interval
    assert 85 <= busy + vcpu.cpu.runq_wait_pct <= 110, vcpu
    # one category holds it all: system on this PVM host (guest time on VMX/SVM hosts)
    assert max(vcpu.cpu.guest_pct, vcpu.cpu.system_pct) >= 0.9 * busy, vcpu
    assert snap.host_cpus == os.cpu_count()
    host = snap.host.guest_pct + snap.host.user_pct + snap.host.system_pct
    assert busy <= host + 5                                   # the VM is part of the host
    assert {m.labels["mode"] for m in snap.metrics()} == {"guest", "user", "system", "runq_wait"}


def test_cli_json(lab):
    name = unique("cj")
    vm, tid = spinning_vm(lab, name)
    res = run_kvmbpf("cpu", "--vm", name, "--json", "1", "2")
    assert res.rc == 0, res.err
    lines = res.json_lines()
    assert len(lines) == 2 and all(0.5 < line["interval_s"] < 3 for line in lines)
    (row,) = [v for v in lines[-1]["vms"] if v["name"] == name]
    assert row["pid"] == vm.pid and [v["tid"] for v in row["vcpus"]] == [tid]
    c = row["vcpus"][0]["cpu"]
    assert 80 <= c["guest_pct"] + c["user_pct"] + c["system_pct"] + c["runq_wait_pct"] <= 120, c
    table = run_kvmbpf("cpu", "--vm", name, "1", "1")
    assert table.rc == 0 and name[:5] in table.out
