"""Pure logic of `kvmbpf steal`: state mask from the format, culprit labels and merging, steal %."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvmbpf.collectors.steal import (UNATTRIBUTED, Culprit, StealSnapshot, VcpuSteal, VmSteal,
                                     label_culprit, merge_culprits, runnable_state_mask, steal_pct)
from kvmbpf.hist import Histogram, slot_of
from kvmbpf.inventory import VM, Thread
from kvmbpf.snapshot import plain
from kvmbpf.tracefs import parse_format

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_state_mask_is_every_flag_of_the_print_format():
    fmt = parse_format((FIXTURES / "sched_switch.format").read_text())
    mask = runnable_state_mask(fmt.print_fmt)
    assert mask == 0xff
    assert 0x100 & mask == 0            # preempted ("R+") counts as runnable
    assert 0x1 & mask and 0x2 & mask    # S and D do not


def test_state_mask_refuses_a_format_without_flags():
    with pytest.raises(ValueError):
        runnable_state_mask('"prev_state=%d", REC->prev_state')


def test_steal_pct_is_wait_over_interval_per_vcpu():
    assert steal_pct(500_000_000, 2.0) == pytest.approx(25.0)
    assert steal_pct(500_000_000, 1.0, vcpus=2) == pytest.approx(25.0)
    assert steal_pct(1, 0.0) == 0.0


def _inventory_threads() -> dict:
    vm = VM(100, "web", "/usr/bin/qemu", [Thread(100, "qemu"), Thread(101, "CPU 0/KVM", 0),
                                           Thread(102, "CPU 1/KVM", 1)])
    return {t.tid: (vm, t) for t in vm.threads}


def test_a_vcpu_culprit_is_named_by_vm_and_vcpu():
    c = label_culprit(102, "CPU 1/KVM", 7, _inventory_threads())
    assert (c.vm, c.vcpu, c.pid, c.wait_ns) == ("web", 1, 100, 7)
    assert c.label == "web/vcpu1"
    assert label_culprit(100, "qemu", 1, _inventory_threads()).label == "web/qemu"


def test_idle_and_gone_culprits():
    idle = label_culprit(0, "swapper/1", 5, {})
    assert idle.label == "idle" and idle.pid == 0
    gone = label_culprit(2**22 - 3, "short-lived", 5, {})     # no such thread
    assert gone.pid is None and gone.label == f"short-lived[{2**22 - 3}]"


def test_unattributed_time_is_its_own_culprit_and_merges():
    c = label_culprit(UNATTRIBUTED, "", 4, _inventory_threads())
    assert (c.tid, c.pid, c.vm, c.label) == (-1, None, None, "(unattributed)")
    merged = merge_culprits([[c], [label_culprit(UNATTRIBUTED, "", 6, {})]])
    assert [(m.label, m.wait_ns) for m in merged] == [("(unattributed)", 10)]


def test_merge_sums_one_task_over_vcpus_biggest_first():
    a = [Culprit("hog", 9, 9, None, None, 10), Culprit("sh", 8, 8, None, None, 3)]
    b = [Culprit("hog", 9, 9, None, None, 5), Culprit("cc", 7, 7, None, None, 12)]
    merged = merge_culprits([a, b])
    assert [(c.comm, c.wait_ns) for c in merged] == [("hog", 15), ("cc", 12), ("sh", 3)]
    assert a[0].wait_ns == 10                                  # inputs untouched


def test_snapshot_json_and_tables():
    hist = Histogram()
    hist.add(slot_of(2_000_000), 3)
    cul = [Culprit("hog", 9, 9, None, None, 6_000_000)]
    vcpu = VcpuSteal(0, 101, 3, 6_000_000, 0.6, hist, cul)
    snap = StealSnapshot(1.0, [VmSteal("web", 100, 6_000_000, 0.6, [vcpu], cul)], 0, 1, 2, 0)
    data = plain(snap)
    assert data["interval_s"] == 1.0 and "_metrics" not in data
    row = data["vms"][0]["vcpus"][0]
    assert row["latency"]["count"] == 3 and row["culprits"][0]["comm"] == "hog"
    vcpus, culprits = snap.tables(10)
    assert vcpus.rows[0][:3] == ["web", "vcpu0", 3]
    assert culprits.rows[0][1] == "hog[9]" and culprits.rows[0][4] == "100"
    assert any("unseen start" in n for n in vcpus.notes)
    assert any(n.startswith("2 waits with more waiting vCPUs") for n in vcpus.notes)
    assert data["no_slot"] == 2
    assert "run-queue wait 6ms" in snap.headline()
