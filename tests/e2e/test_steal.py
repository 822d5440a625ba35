"""`kvmbpf steal` against ground truth: /proc/<pid>/task/<tid>/schedstat field 2 (run delay),
a CPU hog we start and pin next to a spinning lab vCPU, and lab VMs that come and go."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_kvmbpf, unique
from kvmbpf.collectors.base import Scope
from kvmbpf.collectors.steal import StealCollector

SPIN = {"ROUNDS": 1, "FINISH": 1}     # the vCPU spins at 100 % once the guest is "done"
CPU = max(os.sched_getaffinity(0))    # the host CPU the contended threads are pinned to


def sched_prog_ids() -> set[int]:
    """Loaded programs of `kvmbpf steal` (the ones using a map named runnable_at): other
    engineers load sched probes on this host concurrently."""
    def bpftool(*args):
        out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True).stdout
        return json.loads(out or "[]")
    ours = {m["id"] for m in bpftool("map", "list") if m.get("name") == "runnable_at"}
    return {p["id"] for p in bpftool("prog", "list") if ours & set(p.get("map_ids", []))}


def vcpu_tid(pid: int) -> int:
    """vCPU 0's thread, straight from /proc (QEMU names it "CPU 0/KVM")."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == "CPU 0/KVM":
            return int(tid)
    raise AssertionError(f"no vCPU thread in /proc/{pid}/task")


def spinning_vm(lab, name: str, cpu: int = CPU):
    """A lab guest whose vCPU spins, pinned to `cpu`; returns (LabVM, vCPU tid)."""
    vm = lab.start_vm(name, "exits", SPIN)
    vm.wait_for("done")
    tid = vcpu_tid(vm.pid)
    os.sched_setaffinity(tid, {cpu})
    return vm, tid


@contextlib.contextmanager
def pinned_hog(cpu: int = CPU):
    """A busy-looping child pinned to `cpu`, killed by pid on exit.

    Nice -10 (9x the weight of a nice-0 task) so that it, not whatever else other
    people run on this CPU, holds the CPU most of the time the vCPU waits.
    """
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.setpriority(os.PRIO_PROCESS, hog.pid, -10)
        time.sleep(0.3)
        yield hog.pid
    finally:
        hog.kill()
        hog.wait()


def migrations(pid: int, tid: int) -> int:
    """How often the kernel moved a thread between CPUs (se.nr_migrations)."""
    for line in Path(f"/proc/{pid}/task/{tid}/sched").read_text().splitlines():
        if line.startswith("se.nr_migrations"):
            return int(line.split(":")[1])
    raise AssertionError("no se.nr_migrations in /proc/<pid>/task/<tid>/sched")


def schedstat(pid: int, tid: int) -> tuple[int, int, int]:
    """(CPU time ns, run delay ns, timeslices) of a thread: its /proc schedstat fields."""
    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return int(fields[0]), int(fields[1]), int(fields[2])


def measured_interval(collector, threads: list[tuple[int, int]], seconds: float = 4.0):
    """One collector interval with schedstat of (pid, tid) threads read before and after
    each snapshot(): the snapshot and, per thread, the smallest and largest possible
    (CPU time, run delay, timeslices) deltas over the interval.  This machine is busy:
    a long wait can end while we are between two reads."""
    def read():
        return [schedstat(*t) for t in threads]
    pre0 = read()
    collector.snapshot()
    post0 = read()
    time.sleep(seconds)
    pre1 = read()
    snap = collector.snapshot()
    post1 = read()
    return snap, [Bracket(tuple(b - a for a, b in zip(x0, y1)), tuple(b - a for a, b in zip(y0, x1)))
                  for x0, y0, x1, y1 in zip(pre0, post0, pre1, post1)]


@dataclass
class Bracket:
    """Per-thread schedstat deltas: the largest (outer reads) and smallest (inner reads)."""
    outer: tuple[int, int, int]
    inner: tuple[int, int, int]

    def check(self, field: int, value: int, rel: float, slack: float = 0) -> None:
        low, high = self.inner[field] * (1 - rel) - slack, self.outer[field] * (1 + rel) + slack
        assert low <= value <= high, f"{value} not in [{low:.0f}, {high:.0f}] (schedstat {self})"


def vcpu_row(snap, name: str):
    vms = [vm for vm in snap.vms if vm.name == name]
    assert len(vms) == 1, f"{name} not in {[vm.name for vm in snap.vms]}"
    assert len(vms[0].vcpus) == 1
    return vms[0], vms[0].vcpus[0]


def in_flight(vcpu) -> float:
    """How far culprit charges may be from the wait total in one interval: charges accrue
    at every switch during a wait, the total when it ends, so a wait in flight at either
    end of the interval counts on one side only; a migration whose event the kernel skipped
    (its recursion guard) leaves a split approximate, hence the 2 % floor."""
    return max(2 * vcpu.latency.percentiles()["max"] + 1e6, 0.02 * vcpu.wait_ns)


def test_wait_matches_schedstat_and_the_hog_is_the_culprit(lab, no_leaked_probes):
    """The vCPU never sleeps, so every ns the hog runs on its CPU is a ns the vCPU waits:
    the hog is charged its own CPU time (schedstat field 1), capped by the vCPU's wait
    (field 2).  Nice -10, not SCHED_FIFO: a FIFO hog would starve the vCPU (and everyone
    else on this CPU) into a handful of second-long waits; at nice -10 the vCPU still
    runs every few ms, so there are hundreds of waits and the hog outweighs others' work."""
    name = unique("st")
    vm, tid = spinning_vm(lab, name)
    with pinned_hog() as hog:
        collector = StealCollector(Scope((name,)))
        try:
            snap, deltas = measured_interval(collector, [(vm.pid, tid), (hog, hog)])
        finally:
            collector.close()
    vcpu_truth, hog_truth = deltas
    row, vcpu = vcpu_row(snap, name)
    assert (row.pid, vcpu.tid, vcpu.vcpu) == (vm.pid, tid, 0)      # real tids, not garbage
    assert vcpu_truth.inner[1] > 0.2e9, "the hog should make the vCPU wait a lot"
    vcpu_truth.check(1, vcpu.wait_ns, 0.05)
    vcpu_truth.check(2, vcpu.waits, 0.05, slack=2)
    assert snap.unmatched <= 1                                        # the wait in flight at attach
    assert vcpu.steal_pct == pytest.approx(100 * vcpu.wait_ns / (snap.interval_s * 1e9))
    pct = vcpu.latency.percentiles()
    assert vcpu.latency.count == vcpu.waits
    assert pct["p50"] <= pct["p90"] <= pct["p99"] <= pct["max"] <= vcpu.wait_ns
    culprits = [(c.label, c.wait_ns) for c in vcpu.culprits[:6]]
    charged = vcpu.culprits[0]
    assert (charged.tid, charged.pid, charged.label) == (hog, hog, f"python[{hog}]"), culprits
    low = min(hog_truth.inner[0], vcpu_truth.inner[1])
    high = min(hog_truth.outer[0], vcpu_truth.outer[1])
    assert 0.85 * low <= charged.wait_ns <= 1.05 * high, (hog_truth, vcpu_truth, culprits)
    assert abs(sum(c.wait_ns for c in vcpu.culprits) - vcpu.wait_ns) <= in_flight(vcpu)
    assert (snap.overflow, snap.no_slot) == (0, 0)


def test_without_a_hog_the_wait_still_matches_schedstat(lab, no_leaked_probes):
    """Other people's work shares this machine: "near zero" means "what schedstat says"."""
    name = unique("st")
    vm, tid = spinning_vm(lab, name)
    collector = StealCollector(Scope((name,)))
    try:
        snap, (truth,) = measured_interval(collector, [(vm.pid, tid)])
    finally:
        collector.close()
    _, vcpu = vcpu_row(snap, name)
    truth.check(1, vcpu.wait_ns, 0.05, slack=8e6)    # + a 4 ms slice in flight at either end
    assert vcpu.tid == tid


def test_two_vms_on_one_cpu_blame_each_other_by_name(lab, no_leaked_probes):
    a, b = unique("sa"), unique("sb")
    vm_a, tid_a = spinning_vm(lab, a)
    vm_b, tid_b = spinning_vm(lab, b)
    collector = StealCollector(Scope((a, b)))
    try:
        snap, (ran_a, ran_b) = measured_interval(
            collector, [(vm_a.pid, tid_a), (vm_b.pid, tid_b)])
    finally:
        collector.close()
    for me, other, other_tid, other_ran in ((a, b, tid_b, ran_b), (b, a, tid_a, ran_a)):
        row, vcpu = vcpu_row(snap, me)
        (charged,) = [c for c in vcpu.culprits if c.tid == other_tid]
        assert (charged.vm, charged.vcpu, charged.label) == (other, 0, f"{other}/vcpu0")
        # both spin: whenever one runs on the shared CPU, the other waits
        assert 0.85 * other_ran.inner[0] <= charged.wait_ns <= other_ran.outer[0] * 1.05, other_ran
        assert f"{other}/vcpu0" in [c.label for c in row.culprits]


def test_more_waiting_vcpus_than_slots_fall_back_and_say_so(lab, no_leaked_probes):
    """One slot per CPU and three spinning vCPUs on one CPU: two wait at once, so waits
    find the slot taken: counted, the last holder named, the rest "(unattributed)"."""
    names = [unique("so") for _ in range(3)]
    vms = [spinning_vm(lab, name) for name in names]
    collector = StealCollector(Scope(tuple(names)), slots=1)
    try:
        snap, truths = measured_interval(collector, [(vm.pid, tid) for vm, tid in vms])
    finally:
        collector.close()
    assert snap.no_slot > 0 and snap.overflow == 0
    unattributed = 0
    for name, truth in zip(names, truths):
        _, vcpu = vcpu_row(snap, name)
        truth.check(1, vcpu.wait_ns, 0.05)
        assert abs(sum(c.wait_ns for c in vcpu.culprits) - vcpu.wait_ns) <= in_flight(vcpu)
        unattributed += sum(c.wait_ns for c in vcpu.culprits if c.label == "(unattributed)")
    assert unattributed > 0


def test_a_vcpu_moved_while_waiting_keeps_its_culprits(lab, no_leaked_probes):
    """A hog on each CPU and the vCPU's affinity flipped between them every 20 ms: it is
    migrated while waiting (sched_migrate_task moves its slot).  Charges still add up to
    the wait and each hog is charged within its CPU time.  (Not "the hogs are the top
    two": half the time the vCPU waits on the other CPU, where others' work runs too.)"""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    name = unique("sm")
    vm, tid = spinning_vm(lab, name, cpus[0])
    with pinned_hog(cpus[0]) as hog0, pinned_hog(cpus[1]) as hog1:
        collector = StealCollector(Scope((name,)))
        stop = time.monotonic() + 5
        def flip():
            n = 0
            while time.monotonic() < stop:
                os.sched_setaffinity(tid, {cpus[n % 2]})
                n += 1
                time.sleep(0.02)
        moved_before = migrations(vm.pid, tid)
        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            snap, (truth, ran0, ran1) = measured_interval(
                collector, [(vm.pid, tid), (hog0, hog0), (hog1, hog1)], seconds=3)
        finally:
            flipper.join()
            collector.close()
    _, vcpu = vcpu_row(snap, name)
    truth.check(1, vcpu.wait_ns, 0.05)
    # Forced migrations every 20 ms race the charging at sched_switch: measured over-charges
    # up to ~4 % of the wait under load (never more than each hog's own CPU time, checked below).
    assert abs(sum(c.wait_ns for c in vcpu.culprits) - vcpu.wait_ns) <= max(in_flight(vcpu),
                                                                            0.06 * vcpu.wait_ns)
    culprits = [(c.label, c.wait_ns) for c in vcpu.culprits]
    assert migrations(vm.pid, tid) - moved_before > 50
    for hog, ran in ((hog0, ran0), (hog1, ran1)):
        (charged,) = [c for c in vcpu.culprits if c.tid == hog]
        assert 0 < charged.wait_ns <= ran.outer[0] * 1.05, (ran, culprits)
    assert (snap.overflow, snap.no_slot) == (0, 0)


def test_vms_coming_and_going(lab, no_leaked_probes):
    a, b = unique("ca"), unique("cb")
    vm_a, tid_a = spinning_vm(lab, a)
    collector = StealCollector(Scope())          # every VM, including ones started later
    try:
        first = collector.snapshot()
        assert [v.tid for vm in first.vms if vm.name == a for v in vm.vcpus] == [tid_a]
        vm_b, tid_b = spinning_vm(lab, b)
        second = collector.snapshot()            # b appears within one interval
        assert [v.tid for vm in second.vms if vm.name == b for v in vm.vcpus] == [tid_b]
        time.sleep(1)
        third = collector.snapshot()             # b's vCPU is traced: it waits behind a
        assert [v.waits > 0 for vm in third.vms if vm.name == b for v in vm.vcpus] == [True]
        vm_a.stop()
        fourth = collector.snapshot()            # a: reported once more, marked gone
        gone = [vm for vm in fourth.vms if vm.name == a]
        assert len(gone) == 1 and gone[0].gone and gone[0].vcpus[0].gone
        fifth = collector.snapshot()             # then dropped
        assert a not in {vm.name for vm in fifth.vms}
        assert b in {vm.name for vm in fifth.vms if not vm.gone}
        assert fifth.overflow == 0
    finally:
        collector.close()


def test_cli_json_agrees_with_schedstat(lab, no_leaked_probes):
    """Through the real CLI: looser, as schedstat also covers the CLI's start-up; compare rates."""
    name = unique("sj")
    vm, tid = spinning_vm(lab, name)
    with pinned_hog() as hog:
        start, delay0 = time.monotonic(), schedstat(vm.pid, tid)[1]
        res = run_kvmbpf("steal", "--vm", name, "--json", "3", "1")
        rate = (schedstat(vm.pid, tid)[1] - delay0) / (time.monotonic() - start)
    assert res.rc == 0, res.err
    (line,) = res.json_lines()
    (row,) = [vm_ for vm_ in line["vms"] if vm_["name"] == name]
    (vcpu,) = row["vcpus"]
    assert (row["pid"], vcpu["tid"], vcpu["vcpu"]) == (vm.pid, tid, 0)
    measured = vcpu["wait_ns"] / line["interval_s"]
    assert abs(measured - rate) <= 0.2 * rate, f"{measured:.3g} ns/s vs schedstat {rate:.3g} ns/s"
    assert vcpu["steal_pct"] == pytest.approx(measured / 1e7)
    assert hog in [c["pid"] for c in vcpu["culprits"][:5]]
    assert set(vcpu["latency"]) >= {"count", "p50", "p90", "p99", "p99.9", "max", "buckets"}


def test_table_output_names_vm_and_culprit(lab, no_leaked_probes):
    name = unique("sx")
    spinning_vm(lab, name)
    with pinned_hog() as hog:
        res = run_kvmbpf("steal", "--vm", name, "-d", "2")
    assert res.rc == 0, res.err
    assert name[:5] in res.out and f"[{hog}]" in res.out


@pytest.mark.parametrize("args", [("--vm", "no-such-vm-x"), ("--pid", "1"), ("0",), ("1", "0"),
                                  ("--top", "0")])
def test_bad_input_is_one_line_and_exit_2(args):
    for command in ("steal", "cpu"):
        res = run_kvmbpf(command, *args)
        assert res.rc == 2, (command, args, res.err)
        assert res.err.startswith("kvmbpf: error: ") and res.err.count("\n") == 1, res.err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_prints_the_interval_and_detaches(lab, no_leaked_probes, sig):
    name = unique("sg")
    spinning_vm(lab, name)
    before = sched_prog_ids()
    proc = subprocess.Popen([sys.executable, "-m", "kvmbpf", "steal", "--vm", name, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        while len(sched_prog_ids() - before) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)                       # sched_wakeup, _wakeup_new, _switch attached
        time.sleep(1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), err
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, (out, err)
    assert f'"name": "{name}"' in lines[0] and '"interval_s": ' in lines[0]
