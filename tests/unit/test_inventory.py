"""VM discovery from fake /proc trees: names, vCPUs, taps, disks."""

import pytest

from kvmbpf import inventory
from kvmbpf.errors import KvmbpfError
from fakeproc import make_proc


@pytest.fixture
def fake(tmp_path):
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    sys.mkdir()
    img = tmp_path / "disk.qcow2"
    img.write_bytes(b"x")
    make_proc(proc, 100, ["/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on"],
              {100: "qemu-system-x86", 101: "CPU 0/KVM", 102: "CPU 1/KVM", 103: "worker"},
              {3: "anon_inode:kvm-vm", 4: "anon_inode:kvm-vcpu:0", 5: "anon_inode:kvm-vcpu:1",
               6: "/dev/net/tun", 7: str(img)},
              {6: "pos:\t0\nflags:\t02\niff:\ttap-web1\n"})
    make_proc(proc, 200, ["/opt/myvmm", "--disk", "x"], {200: "myvmm", 201: "vcpu-thread"},
              {3: "anon_inode:kvm-vm", 9: "anon_inode:kvm-vcpu:0"},
              syscalls={201: "16 0x9 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f00"})
    make_proc(proc, 300, ["/usr/bin/bash"], {300: "bash"}, {0: "/dev/pts/0"})
    return proc, sys


def test_finds_vms_by_kvm_vm_fd_not_by_name(fake):
    inv = inventory.scan(*map(str, fake))
    assert [vm.pid for vm in inv.vms] == [100, 200]


def test_names_vcpus_and_threads(fake):
    web, other = inventory.scan(*map(str, fake)).vms
    assert web.name == "web1"
    assert [(t.vcpu, t.tid) for t in web.vcpus] == [(0, 101), (1, 102)]
    assert other.name == "myvmm-200"                  # stable fallback: comm-pid
    assert [(t.vcpu, t.tid) for t in other.vcpus] == [(0, 201)]   # from KVM_RUN in syscall


def test_taps_and_disks(fake):
    web = inventory.scan(*map(str, fake)).vms[0]
    assert [t.name for t in web.taps] == ["tap-web1"]
    assert len(web.disks) == 1 and web.disks[0].path.endswith("disk.qcow2")


def test_select_by_name_and_pid(fake):
    inv = inventory.scan(*map(str, fake))
    assert [vm.pid for vm in inv.select(("web1",))] == [100]
    assert [vm.pid for vm in inv.select(pids=(200,))] == [200]
    with pytest.raises(KvmbpfError, match="no VM named 'nope'"):
        inv.select(("nope",))
    with pytest.raises(KvmbpfError, match="not a KVM VM"):
        inv.select(pids=(300,))


@pytest.mark.parametrize("argv,name", [
    (["qemu", "-name", "guest=a,,b,debug-threads=on"], "a,b"),
    (["qemu", "-name", "plain"], "plain"),
    (["qemu", "-name", "debug-threads=on,guest=late"], "late"),
    (["qemu", "-m", "1"], None),
])
def test_vm_name_parsing(argv, name):
    assert inventory.vm_name(argv) == name


def test_kernel_dev_encoding():
    assert inventory.kernel_dev(7, 3) == (7 << 20) | 3
