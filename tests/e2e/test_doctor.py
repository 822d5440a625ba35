"""`kvmbpf doctor` tells the truth about this kernel (checked against /sys and /proc directly)."""
import json
import os
import platform
from pathlib import Path

from conftest import run_kvmbpf


def report():
    res = run_kvmbpf("doctor", "--json")
    assert res.rc == 0, res.err
    data = json.loads(res.out)
    return {c["name"]: c for c in data["checks"]}, data["collectors"]


def test_doctor_matches_the_kernel():
    checks, collectors = report()
    assert checks["privileges"]["ok"] and checks["bpf syscall"]["ok"]
    kprobes = Path("/sys/bus/event_source/devices/kprobe").is_dir()
    assert checks["kprobes"]["ok"] == kprobes
    assert checks["uprobes"]["ok"] == Path("/sys/bus/event_source/devices/uprobe").is_dir()
    assert checks["/dev/kvm"]["ok"] == os.path.exists("/dev/kvm")
    assert checks["kernel BTF"]["ok"] == Path("/sys/kernel/btf/vmlinux").is_file()
    build = Path(f"/lib/modules/{platform.release()}/build")
    release = (build / "include/config/kernel.release").read_text().strip()
    assert checks["kernel headers"]["ok"] == (release == platform.release())
    for group in ("kvm", "sched", "block", "net", "skb"):
        assert checks[f"tracepoints {group}:*"]["ok"]
    assert collectors["steal"] is None and collectors["blk"] is None


def test_doctor_explains_a_pvm_host_without_kvm_exit():
    checks, _ = report()
    if not Path("/sys/module/kvm_pvm").is_dir():
        assert checks["kvm:kvm_exit"]["ok"] == Path("/sys/kernel/tracing/events/kvm/kvm_exit").is_dir()
        return
    assert not checks["kvm:kvm_exit"]["ok"]
    assert "PVM" in checks["kvm:kvm_exit"]["detail"] and "never emitted" in checks["kvm:kvm_exit"]["detail"]


def test_doctor_table_runs():
    res = run_kvmbpf("doctor")
    assert res.rc == 0 and "Collectors" in res.out
