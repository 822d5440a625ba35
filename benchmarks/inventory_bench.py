"""How long one inventory scan takes: 100 fake VMs in a /proc-like tree on tmpfs, and the real /proc.

Run: .venv/bin/python benchmarks/inventory_bench.py   (target: < 50 ms for 100 VMs)
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fakeproc import make_proc  # noqa: E402

from kvmbpf import inventory  # noqa: E402


def fake_host(root: Path, vms: int = 100, other_procs: int = 300) -> None:
    for i in range(vms):
        pid = 10000 + i * 10
        fds = {3: "anon_inode:kvm-vm", 4: "anon_inode:kvm-vcpu:0", 5: "anon_inode:kvm-vcpu:1",
               6: "/dev/net/tun"}
        fds.update({10 + j: f"socket:[{i * 100 + j}]" for j in range(30)})
        make_proc(root, pid, ["/usr/bin/qemu-system-x86_64", "-name", f"guest=vm{i},debug-threads=on"],
                  {pid: "qemu-system-x86", pid + 1: "CPU 0/KVM", pid + 2: "CPU 1/KVM", pid + 3: "worker"},
                  fds, {6: f"iff:\ttap{i}\n"})
    for i in range(other_procs):
        make_proc(root, 50000 + i, ["/usr/sbin/daemon"], {50000 + i: "daemon"},
                  {j: f"socket:[{j}]" for j in range(20)})


def timed(fn, repeat: int = 20) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        proc, sys_dir = Path(tmp, "proc"), Path(tmp, "sys")
        proc.mkdir()
        sys_dir.mkdir()
        fake_host(proc)
        fake_ms = timed(lambda: inventory.scan(str(proc), str(sys_dir)))
        found = len(inventory.scan(str(proc), str(sys_dir)).vms)
    real_ms = timed(inventory.scan)
    print(f"fake host, {found} VMs + 300 other processes: median {fake_ms:.1f} ms per scan")
    print(f"this host's /proc ({len(inventory.scan().vms)} VMs): median {real_ms:.1f} ms per scan")


if __name__ == "__main__":
    main()
