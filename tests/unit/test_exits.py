"""kvmbpf exits, pure logic: reason names from the saved kernel formats, rows, summary, alerts, JSON."""
import dataclasses
from pathlib import Path

import pytest

from kvmbpf.collectors.exits import (ExitsSnapshot, Labels, ReasonNames, alerts, build_views,
                                     busiest_per_vm, insn_hint, insn_text, kvm_exit_status, metrics_of, status_notes,
                                     vm_latencies)
from kvmbpf.hist import slot_of
from kvmbpf.snapshot import plain
from kvmbpf.tracefs import parse_format

FIX = Path(__file__).resolve().parent.parent / "fixtures"
VMX, SVM = 1, 2


def print_fmt(name: str) -> str:
    return parse_format((FIX / f"{name}.format").read_text()).print_fmt


@pytest.fixture(scope="module")
def names() -> ReasonNames:
    return ReasonNames.from_print_fmts(print_fmt("kvm_exit"), print_fmt("kvm_userspace_exit"),
                                       print_fmt("kvm_mmio"), print_fmt("kvm_emulate_insn"))


def test_vmx_reasons_are_masked_and_flags_named(names):
    assert names.exit_reason(VMX, 30) == ("IO_INSTRUCTION", [])
    assert names.exit_reason(VMX, 0x80000021) == ("INVALID_STATE", ["FAILED_VMENTRY"])
    assert names.exit_reason(VMX, 0x08000000 | 12) == ("HLT", ["0x8000000"])   # unnamed flag bit
    assert names.exit_reason(VMX, 99) == ("99", [])                          # no name: a number


def test_svm_reasons_including_minus_one(names):
    assert names.exit_reason(SVM, 0x7B) == ("io", [])
    assert names.exit_reason(SVM, 0x400) == ("npf", [])
    assert names.exit_reason(SVM, 0x40 + 14) == ("PF excp", [])
    assert names.exit_reason(SVM, 0xFFFFFFFF) == ("invalid_guest_state", [])
    assert names.exit_reason(SVM, 0x1234) == ("0x1234", [])
    assert names.exit_reason(7, 5) == ("5", [])                              # an unknown isa


def test_userspace_and_mmio_names(names):
    assert names.userspace_reason(2) == "KVM_EXIT_IO"
    assert names.userspace_reason(6) == "KVM_EXIT_MMIO"
    assert names.userspace_reason(-4) == "restart"
    assert names.userspace_reason(-14) == "error"
    assert names.userspace_reason(250) == "250"
    assert [names.mmio_access(k) for k in (0, 1, 2, 9)] == ["unsatisfied-read", "read", "write", "9"]


def test_names_without_formats_are_numbers():
    empty = ReasonNames.from_print_fmts("", "", "")
    assert empty.exit_reason(VMX, 0x8000001E) == ("30", ["0x80000000"])
    assert empty.userspace_reason(2) == "2"
    assert empty.cpu_mode(1) == "0x1"


def test_cpu_modes_from_the_bit_expressions_of_the_format(names):
    assert [names.cpu_mode(f) for f in (0, 1, 3, 5, 9, 2)] == ["real", "prot16", "vm16", "prot32",
                                                               "prot64", "0x2"]


def le(*data: int) -> int:
    """An instruction key as exits.bpf.c builds it: byte 0 in the low bits."""
    return int.from_bytes(bytes(data), "little")


def test_instruction_bytes_and_hints():
    assert insn_text(le(0x0F, 0x22, 0xC0), 3) == "0f 22 c0"
    assert insn_text(le(0x66, 0x3D, 0x80, 0xD9), 6) == "66 3d 80 d9 .."
    assert insn_text(0, 0) == ""
    assert insn_hint(bytes([0x0F, 0x22, 0xC0])) == "mov to cr0"
    assert insn_hint(bytes([0x0F, 0x22, 0xE0])) == "mov to cr4"
    assert insn_hint(bytes([0x0F, 0x20, 0xC0])) == "mov from cr0"
    assert insn_hint(bytes([0x0F, 0x22])) == "mov to cr"          # ModRM not kept
    assert insn_hint(bytes([0x66, 0xEF])) == "out"                # prefix skipped
    assert insn_hint(bytes([0xE4, 0x71])) == "in"
    assert insn_hint(bytes([0x0F, 0xA2])) == "cpuid"
    assert insn_hint(bytes([0x66, 0x31, 0xD2])) == ""             # not in the table
    assert insn_hint(bytes([0x66, 0x66])) == insn_hint(bytes([0x0F])) == ""


def hist_rows(prefix: tuple, values: list[int]) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    for v in values:
        key = prefix + (slot_of(v),)
        out[key] = out.get(key, 0) + 1
    return out


def fixture_maps() -> dict[str, dict[tuple, int]]:
    """Two VMs: vm-a (SVM) exits for io (fast) and hlt (long: idle); vm-b only userspace/PIO/MMIO."""
    return {
        "exit_counts": {(100, 0, SVM, 0x7B): 30_000, (100, 0, SVM, 0x78): 10, (100, 1, SVM, 0x7B): 5},
        "exit_lat": {**hist_rows((100, 0, SVM, 0x7B), [1000] * 99 + [5000]),
                     **hist_rows((100, 0, SVM, 0x78), [5_000_000] * 10)},
        "uexit_counts": {(200, 201, 2): 40, (200, 201, -4): 1},
        "vmm_lat": hist_rows((200, 201, 2), [2000] * 40),
        "pio_counts": {(200, 0x700, 1): 40, (200, 0x21, 1): 25_000, (200, 0x21, 0): 2},
        "mmio_counts": {(200, 2, 0x80000000): 7},
        # vm-b, vcpu0 (tid 201): a mode switch loop; the second mov to cr0 runs in prot16.
        "emul_counts": {(200, 201, le(0x0F, 0x22, 0xC0), 3, 0, 0): 12_000,
                        (200, 201, le(0x0F, 0x22, 0xC0), 3, 1, 0): 12_000,
                        (200, 201, le(0x0F, 0x20, 0xC0), 3, 0, 0): 12_000,
                        (200, 202, le(0x0F, 0x0B), 2, 0, 0): 2,
                        (200, 202, le(0x0F, 0x0B), 2, 0, 1): 2},
    }


@pytest.fixture
def views(names):
    labels = Labels(names, {100: "vm-a", 200: "vm-b"}, {201: 0})
    return build_views(fixture_maps(), 2.0, labels)


def test_rows_are_labelled_and_sorted(views):
    top = views.exits[0]
    assert (top.vm, top.vcpu, top.isa, top.reason, top.count, top.rate) == ("vm-a", 0, "svm", "io", 30_000, 15_000)
    assert top.latency.count == 100 and not top.idle
    hlt = next(r for r in views.exits if r.reason == "hlt")
    assert hlt.idle and hlt.latency.count == 10
    assert [(r.reason, r.vcpu, r.tid, r.count) for r in views.userspace] == [
        ("KVM_EXIT_IO", 0, 201, 40), ("restart", 0, 201, 1)]
    assert views.userspace[1].vmm_time.count == 0
    assert [(r.port, r.direction, r.count) for r in views.pio] == [(0x21, "out", 25_000), (0x700, "out", 40),
                                                                   (0x21, "in", 2)]
    assert (views.mmio[0].vm, views.mmio[0].gpa, views.mmio[0].access) == ("vm-b", 0x80000000, "write")


def test_summary_leaves_idle_exits_out_unless_asked(views):
    (summary,) = vm_latencies(views.exits, include_idle=False)
    assert summary.count == 30_005 and summary.latency.count == 100
    assert summary.latency.max() < 1_000_000
    (with_idle,) = vm_latencies(views.exits, include_idle=True)
    assert with_idle.count == 30_015 and with_idle.latency.max() >= 5_000_000


def test_emulated_rows_per_vcpu_and_instruction(views):
    assert [(r.vm, r.vcpu, r.tid, r.count, r.failed, r.rate) for r in views.emulated] == [
        ("vm-b", 0, 201, 36_000, 0, 18_000), ("vm-b", None, 202, 2, 2, 1)]
    assert [(r.insn, r.length, r.mode, r.hint, r.count, r.failed) for r in views.insns] == [
        ("0f 22 c0", 3, "real", "mov to cr0", 12_000, 0), ("0f 22 c0", 3, "prot16", "mov to cr0", 12_000, 0),
        ("0f 20 c0", 3, "real", "mov from cr0", 12_000, 0), ("0f 0b", 2, "real", "", 2, 2)]


def test_busiest_instruction_rows_per_vm(views):
    assert [(r.vm, r.insn, r.mode) for r in busiest_per_vm(views.insns, 2)] == [
        ("vm-b", "0f 22 c0", "real"), ("vm-b", "0f 22 c0", "prot16")]
    other = [dataclasses.replace(r, vm="vm-c", pid=300) for r in views.insns]
    kept = busiest_per_vm(sorted(views.insns + other, key=lambda r: -r.count), 1)
    assert [(r.vm, r.insn, r.mode) for r in kept] == [("vm-b", "0f 22 c0", "real"),
                                                      ("vm-c", "0f 22 c0", "real")]


def test_alerts_sum_vcpus_and_respect_threshold(views):
    found = {(a.vm, a.view, a.what) for a in alerts(views, 2.0, 10_000)}
    # mov to cr0 is 6000/s in each mode: 12000/s for the VM
    assert found == {("vm-a", "exit", "io"), ("vm-b", "pio", "port 0x21 out"),
                     ("vm-b", "emulated", "0f 22 c0 mov to cr0")}
    # vcpu0 alone is 15000/s; with vcpu1's 5 exits the VM's 'io' is 15002.5/s
    assert {a.what for a in alerts(views, 2.0, 12_001)} == {"io", "port 0x21 out"}
    assert {a.what for a in alerts(views, 2.0, 15_001)} == {"io"}
    assert alerts(views, 2.0, 15_002.5) == []


def test_kvm_exit_status(names, views):
    assert kvm_exit_status(views) == "seen"
    labels = Labels(names, {}, {})
    no_exit = {**fixture_maps(), "exit_counts": {}, "exit_lat": {}}
    quiet = build_views(no_exit, 1.0, labels)
    assert kvm_exit_status(quiet) == "not-emitted"
    (note,) = status_notes("not-emitted", quiet, True)
    assert "does not emit kvm:kvm_exit (a PVM host" in note
    assert "61092 exits to the VMM, PIO/MMIO accesses and emulated instructions" in note
    assert "views are complete" not in note
    only_emulated = build_views({**{k: {} for k in no_exit}, "emul_counts": no_exit["emul_counts"]},
                                1.0, labels)
    assert kvm_exit_status(only_emulated) == "not-emitted"
    assert status_notes("seen", views, True) == []
    empty = build_views({k: {} for k in no_exit}, 1.0, labels)
    assert kvm_exit_status(empty) == "no-events"


def snapshot(views, include_idle=False, missed=0) -> ExitsSnapshot:
    return ExitsSnapshot(2.0, {"vm-a": 100, "vm-b": 200}, "seen", include_idle, 10_000.0, views.exits,
                         vm_latencies(views.exits, include_idle), views.userspace, views.pio, views.mmio,
                         views.emulated, views.insns, alerts(views, 2.0, 10_000.0), [], 3, missed,
                         metrics_of(views))


def test_snapshot_tables(views):
    snap = snapshot(views)
    tables = {t.title.split(" (")[0]: t for t in snap.tables(top=2)}
    exits = tables["exit reasons"]
    assert exits.rows[0][:6] == ["vm-a", "0", "svm", "io", 30_000, 15_000.0]
    assert len(exits.rows) == 2 and "3 events not recorded" in exits.notes[-1]
    latency = tables["exit handling latency per VM"]
    assert latency.rows[0][:2] == ["vm-a", 30_005] and "--include-idle" in latency.notes[0]
    assert tables["exits to the VMM"].rows[0][3] == "IO"
    assert tables["PIO ports"].rows[0][1] == "0x21"
    assert tables["MMIO addresses"].rows == [["vm-b", "0x80000000", "write", 7, 3.5]]
    assert tables["instructions emulated by KVM per vCPU"].rows == [["vm-b", "0", 201, 36_000, 0, 18_000.0],
                                                                    ["vm-b", "-", 202, 2, 2, 1.0]]
    assert tables["top emulated instructions"].rows[0] == ["vm-b", "0f 22 c0", 3, "real", "mov to cr0",
                                                           12_000, 0, 6000.0]
    assert "hint" in tables["top emulated instructions"].title
    assert "3 ALERT(S)" in snap.headline() and "emulated 18001/s" in snap.headline()
    assert not any("missed" in n for n in exits.notes)
    missed_notes = snapshot(views, missed=5).tables(top=2)[0].notes
    assert "5 events missed this interval" in missed_notes[-1]
    idle_row = next(r for r in snapshot(views).tables(top=10)[0].rows if r[3].startswith("hlt"))
    assert idle_row[3] == "hlt (idle)"


def test_snapshot_json_shape(views):
    data = plain(snapshot(views))
    assert set(data) == {"interval_s", "vms", "kvm_exit", "include_idle", "alert_rate", "exits",
                         "exit_latency", "userspace_exits", "pio", "mmio", "emulated", "emulated_insns",
                         "alerts", "notes", "overflow", "missed"}
    assert data["emulated_insns"][0] == {"vm": "vm-b", "pid": 200, "insn": "0f 22 c0", "length": 3,
                                         "mode": "real", "hint": "mov to cr0", "count": 12_000,
                                         "failed": 0, "rate": 6000.0}
    row = data["exits"][0]
    assert row["reason"] == "io" and row["code"] == 0x7B and row["latency"]["count"] == 100
    assert row["latency"]["p50"] == pytest.approx(1000, rel=0.04)
    assert data["userspace_exits"][0]["vmm_time"]["p99"] == pytest.approx(2000, rel=0.04)
    assert data["exit_latency"][0]["latency"]["count"] == 100


def test_metrics_are_counters_and_histograms(views):
    by_name = {}
    for m in metrics_of(views):
        by_name.setdefault(m.name, []).append(m)
    assert sum(m.value for m in by_name["kvmbpf_exits_total"]) == 30_015
    assert by_name["kvmbpf_pio_total"][0].labels == {"vm": "vm-b", "port": "0x21", "direction": "out"}
    assert all(m.kind == "histogram" and m.scale == 1e-9 for m in by_name["kvmbpf_vmm_time_seconds"])
    assert [(m.labels, m.value) for m in by_name["kvmbpf_emulated_insns_total"]] == [
        ({"vm": "vm-b", "vcpu": "0"}, 36_000), ({"vm": "vm-b", "vcpu": "-"}, 2)]
    assert [m.value for m in by_name["kvmbpf_emulation_failures_total"]] == [0, 2]


def test_vm_slots_share_a_slot_only_on_collision():
    """Two traced tgids in the same slot: the slot says 'shared' (the hash decides)."""
    from kvmbpf.collectors.exits import SLOT_SHARED, VM_SLOTS, vm_slots
    slots = vm_slots([5, 7, 5 + VM_SLOTS])
    assert slots == {5: SLOT_SHARED, 7: 7}
    assert vm_slots([]) == {}


def test_userspace_exits_are_the_vmm_time_samples():
    from kvmbpf.collectors.exits import exits_of
    assert exits_of({(200, 201, 2, 40): 3, (200, 201, 2, 41): 4, (200, 201, -4, 9): 1}) == \
        {(200, 201, 2): 7, (200, 201, -4): 1}


def test_pio_counts_merge_slots_and_spill():
    """Slot entries (tgid, port | rw << 16, count) add to the spill hash; free ones are skipped."""
    from kvmbpf.collectors.exits import pio_of
    slots = [(100, 0x21 | 1 << 16, 5), (100, 0x21 | 1 << 16, 2), (100, 0x700, 3), (0, 0, 0)]
    assert pio_of(slots, {(100, 0x21, 1): 1, (200, 0x3f8, 1): 4}) == \
        {(100, 0x21, 1): 8, (100, 0x700, 0): 3, (200, 0x3f8, 1): 4}
