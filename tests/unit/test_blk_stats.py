"""kvmbpf blk: device parsing, map rows -> per-VM/device stats, argument checks (no BPF)."""
import ctypes

import pytest

from kvmbpf.collectors.base import Scope
from kvmbpf.collectors.blk import (COUNTERS, DEPTH, ISSUE, KINDS, NO_OWNER, NO_REQUESTS, OPS, QUEUE,
                                   SIZE,
                                   BlkCollector, BlkSnapshot, build_stats, device_map, op_metrics,
                                   parse_device, row_counts, row_layout, split_dev, sum_cpus,
                                   vm_devices)
from kvmbpf.errors import KvmbpfError
from kvmbpf.hist import slot_of
from kvmbpf.inventory import VM, Disk, bio_only_devices, kernel_dev


@pytest.fixture
def sysfs(tmp_path):
    for name, majmin in (("loop3", "7:3"), ("sda", "8:0"), ("nvme0n1", "259:0")):
        (tmp_path / "class" / "block" / name).mkdir(parents=True)
        (tmp_path / "class" / "block" / name / "dev").write_text(majmin + "\n")
        (tmp_path / "dev" / "block" / majmin).mkdir(parents=True)
    return str(tmp_path)


@pytest.mark.parametrize("spec,want", [("loop3", (7, 3)), ("/dev/loop3", (7, 3)), ("7:3", (7, 3)),
                                       ("sda", (8, 0)), ("259:0", (259, 0))])
def test_parse_device(sysfs, spec, want):
    assert parse_device(spec, sys=sysfs) == want


@pytest.mark.parametrize("spec", ["loop9", "9:9", "", "../loop3", "/dev/../loop3", "7:3x", "sda; rm"])
def test_unknown_device_is_an_error(sysfs, spec):
    with pytest.raises(KvmbpfError, match="no block device"):
        parse_device(spec, sys=sysfs)


def test_dev_encoding_round_trips():
    assert split_dev(kernel_dev(259, 65537)) == (259, 65537)
    assert split_dev(kernel_dev(7, 3)) == (7, 3)


LOOP3 = kernel_dev(7, 3)
SDA = kernel_dev(8, 0)
READ, WRITE, FLUSH = OPS.index("read"), OPS.index("write"), OPS.index("flush")


def _rows():
    hists = {
        (100, LOOP3, READ, QUEUE, slot_of(20_000)): 4, (100, LOOP3, READ, ISSUE, slot_of(15_000)): 4,
        (100, LOOP3, READ, SIZE, slot_of(512)): 4, (100, LOOP3, READ, DEPTH, 1): 3,
        (100, LOOP3, READ, DEPTH, 2): 1,
        (100, LOOP3, FLUSH, QUEUE, slot_of(150_000)): 2, (100, LOOP3, FLUSH, SIZE, 0): 2,
        (100, LOOP3, FLUSH, DEPTH, 1): 2,
        (0, SDA, WRITE, ISSUE, slot_of(90_000)): 1, (0, SDA, WRITE, SIZE, slot_of(4096)): 1,
    }
    c = COUNTERS.index
    counts = {(100, LOOP3, READ, c("bytes")): 2048, (100, LOOP3, READ, c("backmerges")): 5,
              (100, LOOP3, FLUSH, c("errors")): 1, (100, LOOP3, FLUSH, c("requeues")): 1,
              (0, SDA, WRITE, c("bytes")): 4096}
    return build_stats(hists, counts, {100: "web", 0: "host"}.__getitem__,
                       {LOOP3: "loop3", SDA: "sda"}.__getitem__)


def test_requests_are_the_size_histograms_count():
    """One size sample per completed request: a row with latencies but no size has none."""
    ops, _ = build_stats({(1, LOOP3, READ, SIZE, slot_of(512)): 3, (1, LOOP3, WRITE, QUEUE, 9): 2},
                         {}, str, str)
    assert [(o.op, o.requests) for o in ops] == [("read", 3)]


class RowStats(ctypes.Structure):
    """Like bcc's type for blk.bpf.c's struct row_stats, with short histograms."""
    _fields_ = [(name, ctypes.c_uint64) for name in COUNTERS] + \
               [(name, ctypes.c_uint64 * n) for name, n in zip(KINDS, (20, 20, 16, 8))]


def test_stats_rows_become_hist_and_counter_rows():
    """A per-CPU row, summed over CPUs, read by the compiled struct's field names."""
    layout = row_layout(RowStats)
    assert layout["bytes"] == (0, 1) and layout["queue"] == (len(COUNTERS), 20)
    cpu0, cpu1 = RowStats(), RowStats()
    cpu0.bytes, cpu1.bytes, cpu1.requeues = 512, 1024, 1
    cpu0.queue[slot_of(17)] = 2
    cpu1.queue[slot_of(17)] = 1
    cpu1.size[5] = 3
    cpu0.depth[1] = 3
    words = sum_cpus(bytes(cpu0) + bytes(cpu1), 2)
    assert words[layout["bytes"][0]] == 1536
    hists, counts = row_counts({(100, LOOP3, READ): 5}, {5: words}, layout)
    assert counts == {(100, LOOP3, READ, COUNTERS.index("bytes")): 1536,
                      (100, LOOP3, READ, COUNTERS.index("requeues")): 1}
    assert hists[(100, LOOP3, READ, QUEUE, slot_of(17))] == 3
    assert hists[(100, LOOP3, READ, DEPTH, 1)] == 3
    assert hists[(100, LOOP3, READ, SIZE, 5)] == 3 and len(hists) == 3
    assert row_counts({(1, 2, 3): 7}, {5: words}, layout) == ({}, {})   # row not read yet


def test_device_map_filters_only_with_dev():
    owners = {LOOP3: 100}
    assert device_map(owners, [], []) == owners
    assert device_map(owners, [LOOP3, SDA], []) == {LOOP3: 100, SDA: NO_OWNER}
    assert device_map({}, [SDA], []) == {SDA: NO_OWNER}


def test_device_map_marks_bio_only_devices_in_both_modes():
    zram = kernel_dev(252, 0)
    assert device_map({LOOP3: 100}, [], [zram]) == {LOOP3: 100, zram: NO_REQUESTS}
    assert device_map({}, [SDA, zram], [zram]) == {SDA: NO_OWNER, zram: NO_REQUESTS}


def test_bio_only_devices_from_sysfs(tmp_path):
    """A blk-mq disk (mq/) and its partition, a dm device (a slave under it), a zram disk and
    a pmem partition (neither): only the last two complete bios themselves."""
    def disk(name, dev, mq=False, slaves=(), parent=None):
        d = (parent or tmp_path / "devices") / name
        d.mkdir(parents=True)
        (d / "slaves").mkdir()
        for s in slaves:
            (d / "slaves" / s).touch()
        if mq:
            (d / "mq").mkdir()
        if parent:
            (d / "partition").write_text("1")
        link = tmp_path / "dev" / "block" / dev
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(d)
        return d
    sda = disk("sda", "8:0", mq=True)
    disk("sda1", "8:1", parent=sda)
    disk("dm-0", "253:0", slaves=("sda1",))
    disk("zram0", "252:0")
    disk("pmem0p1", "259:1", parent=disk("pmem0", "259:0"))
    assert bio_only_devices(str(tmp_path)) == [(252, 0), (259, 0), (259, 1)]


def test_build_stats_rows_per_vm_device_op():
    ops, devices = _rows()
    by = {(o.vm, o.device, o.op): o for o in ops}
    assert set(by) == {("web", "loop3", "read"), ("web", "loop3", "flush"), ("host", "sda", "write")}
    read = by["web", "loop3", "read"]
    assert (read.requests, read.bytes, read.errors, read.dev) == (4, 2048, 0, "7:3")
    assert read.queue_to_complete.count == read.issue_to_complete.count == read.size.count == 4
    assert abs(read.queue_to_complete.percentiles()["p50"] - 20_000) <= 20_000 / 32
    flush = by["web", "loop3", "flush"]
    assert (flush.requests, flush.errors, flush.issue_to_complete.count) == (2, 1, 0)
    host = by["host", "sda", "write"]
    assert host.queue_to_complete.count == 0 and host.issue_to_complete.count == 1


def test_device_rows_sum_over_operations():
    _, devices = _rows()
    web = next(d for d in devices if d.vm == "web")
    assert (web.requests, web.backmerges, web.requeues, web.errors) == (6, 5, 1, 1)
    assert web.depth.count == 6 and web.depth.max() == 2


def test_snapshot_renders_and_exports():
    ops, devices = _rows()
    snap = BlkSnapshot(2.0, ops, devices, overflow=3, missed=2, expired=0,
                       _metrics=op_metrics(ops, devices))
    assert snap.headline().startswith("blk: 7 requests (4/s)")
    queue, issue, per_dev = snap.tables(top=10)
    assert len(queue.rows) == 3 and queue.rows[0][:4] == ["web", "loop3", "read", 4]
    assert any("3 events not recorded" in n for n in queue.notes)
    assert any("2 events missed" in n for n in queue.notes)
    quiet = BlkSnapshot(2.0, ops, devices, overflow=0, missed=0, expired=0)
    assert quiet.tables(top=10)[0].notes == []
    assert len(per_dev.rows) == 2
    names = {(m.name, m.labels.get("op"), m.labels.get("interval")) for m in snap.metrics()}
    assert ("kvmbpf_blk_latency_seconds", "read", "queue") in names
    assert ("kvmbpf_blk_latency_seconds", "write", "queue") not in names   # host write: issue only
    assert ("kvmbpf_blk_requests_total", "flush", None) in names


@pytest.mark.parametrize("kwargs,scope,msg", [
    ({"all_io": True}, Scope(("web",)), "--all"),
    ({"all_io": True}, Scope((), (123,)), "--all"),
    ({}, Scope((), (), (0,)), "--vcpu"),
])
def test_conflicting_options(kwargs, scope, msg):
    with pytest.raises(KvmbpfError, match=msg):
        BlkCollector(scope, **kwargs)


def _vm(pid: int, *paths: str) -> VM:
    devs = {"/dev/loop3": (7, 3), "/dev/loop4": (7, 4), "/dev/loop5": (7, 5),
            "/var/lib/images/boot.img": (254, 0), "/dev/vda": (254, 0)}
    return VM(pid, f"vm{pid}", "qemu", disks=[Disk(p, *devs[p]) for p in paths])


def _is_block(path: str) -> bool:
    return path.startswith("/dev/")


def test_vm_devices_only_block_devices_one_vm_owns():
    """A loop device one VM has open is that VM's; one two VMs share, the disk holding image
    files (the host's too) and devices of VMs out of scope are left to thread attribution."""
    vms = [_vm(100, "/dev/loop3", "/dev/loop5", "/var/lib/images/boot.img"),
           _vm(200, "/dev/loop4", "/dev/loop5"),
           _vm(300, "/dev/vda")]
    assert vm_devices(vms, vms, _is_block) == {kernel_dev(7, 3): 100, kernel_dev(7, 4): 200}
    assert vm_devices(vms[1:], vms, _is_block) == {kernel_dev(7, 4): 200}
    assert vm_devices([], vms, _is_block) == {}
