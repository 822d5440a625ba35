"""What this kernel offers kvmbpf: privileges, BPF, tracefs, BTF, headers, probes, KVM.

Each check answers one question, names the kvmbpf features that depend on it,
and says what to do when it fails.  `kvmbpf doctor` prints them; collectors
ask the same functions before they attach.
"""
from __future__ import annotations

import ctypes
import gzip
import os
import platform
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from . import tracefs
from .bpf import bpf_syscall

#: Tracepoints each collector needs (group, name); the first ones are required.
COLLECTOR_TRACEPOINTS: dict[str, list[tuple[str, str]]] = {
    "exits": [("kvm", "kvm_userspace_exit"), ("kvm", "kvm_pio"), ("kvm", "kvm_mmio"),
              ("kvm", "kvm_exit"), ("kvm", "kvm_entry")],
    "steal": [("sched", "sched_switch"), ("sched", "sched_wakeup"), ("sched", "sched_wakeup_new")],
    "blk": [("block", "block_bio_queue"), ("block", "block_rq_issue"), ("block", "block_rq_complete"),
            ("block", "block_rq_insert"), ("block", "block_bio_backmerge"),
            ("block", "block_bio_frontmerge"), ("block", "block_rq_requeue")],
    "net": [("net", "netif_receive_skb"), ("net", "net_dev_xmit"), ("net", "net_dev_queue"),
            ("skb", "kfree_skb")],
}
GROUPS = ("kvm", "sched", "block", "net", "skb", "bridge")
CAP_PERFMON, CAP_BPF, CAP_SYS_ADMIN = 38, 39, 21


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    affects: str = ""        # which kvmbpf features need it
    fix: str = ""            # what to do when it fails
    warn: bool = False       # not fatal for anything (informational)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    collectors: dict[str, str | None] = field(default_factory=dict)   # name -> None or why off

    @property
    def runnable(self) -> list[str]:
        return [name for name, why in self.collectors.items() if why is None]


def kernel_config() -> dict[str, str]:
    """CONFIG_* of the running kernel from /proc/config.gz or /boot (empty when unknown)."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        text = raw.decode(errors="replace")
        conf = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", text, re.M))
        conf.update({k: "n" for k in re.findall(r"^# (CONFIG_\w+) is not set", text, re.M)})
        return conf
    return {}


def capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def privileged() -> bool:
    caps = capabilities()
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    return os.geteuid() == 0 or has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def bpf_syscall_works() -> tuple[bool, str]:
    """Create (and close) a one-entry BPF array map: the cheapest proof the syscall works."""
    attr = (ctypes.c_uint32 * 30)()
    attr[0], attr[1], attr[2], attr[3] = 2, 4, 4, 1     # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    fd = bpf_syscall(0, attr)                            # BPF_MAP_CREATE
    if fd < 0:
        return False, os.strerror(-fd)
    os.close(fd)
    return True, "BPF_MAP_CREATE works"


@dataclass(frozen=True)
class Headers:
    path: str | None
    release: str | None
    matches: bool


@lru_cache(maxsize=1)
def headers() -> Headers:
    """Kernel headers bcc will use, and whether they are for this exact kernel."""
    build = Path(f"/lib/modules/{platform.release()}/build")
    if not build.is_dir():
        return Headers(None, None, False)
    release = None
    for cand in ("include/config/kernel.release", "include/generated/utsrelease.h"):
        text = (build / cand).read_text(errors="replace") if (build / cand).is_file() else ""
        m = re.search(r'"?([0-9][^"\s]*)"?\s*$', text.strip())
        if m:
            release = m.group(1)
            break
    real = os.path.realpath(build)
    return Headers(real, release, release == platform.release())


def kvm_flavour() -> str:
    """'pvm', 'intel', 'amd' or 'none': PVM runs guests without emitting kvm_exit."""
    mods = Path("/sys/module")
    for name, flavour in (("kvm_pvm", "pvm"), ("kvm_intel", "intel"), ("kvm_amd", "amd")):
        if (mods / name).is_dir():
            return flavour
    return "none"


def has_kprobes() -> bool:
    root = _tracefs()
    return Path("/sys/bus/event_source/devices/kprobe").is_dir() or bool(
        root and (root / "kprobe_events").exists())


def has_uprobes() -> bool:
    root = _tracefs()
    return Path("/sys/bus/event_source/devices/uprobe").is_dir() or bool(
        root and (root / "uprobe_events").exists())


@lru_cache(maxsize=1)
def fentry_works() -> tuple[bool, str]:
    """Really load an fentry program (config flags alone have lied on sandboxed hosts)."""
    if not Path("/sys/kernel/btf/vmlinux").is_file():
        return False, "no kernel BTF"
    try:
        from .bpf import fentry_probe  # noqa: PLC0415 (bcc is optional)
        return fentry_probe()
    except Exception as exc:  # noqa: BLE001 (any failure means: not available)
        return False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _tracefs() -> Path | None:
    try:
        return tracefs.tracefs_root()
    except Exception:  # noqa: BLE001
        return None


def cpu_virt_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text(errors="replace")
    return {flag for flag in ("vmx", "svm") if re.search(rf"\b{flag}\b", text)}


def collect() -> Report:
    """Run every check."""
    rep = Report()
    add = rep.checks.append
    priv = privileged()
    add(Check("privileges", priv, f"euid {os.geteuid()}, CapEff {capabilities():#x}",
              "every tracing command", "run as root, or grant CAP_BPF and CAP_PERFMON"))
    bpf_ok, bpf_detail = bpf_syscall_works() if priv else (False, "not tried without privileges")
    add(Check("bpf syscall", bpf_ok, bpf_detail, "every tracing command",
              "kernel needs CONFIG_BPF_SYSCALL; check seccomp/lockdown"))
    root = _tracefs()
    add(Check("tracefs", root is not None, str(root) if root else "not mounted",
              "every tracing command", "mount -t tracefs nodev /sys/kernel/tracing"))
    btf = Path("/sys/kernel/btf/vmlinux").is_file()
    add(Check("kernel BTF", btf, "/sys/kernel/btf/vmlinux" if btf else "absent",
              "fentry probes, packet-level net view", "kernel needs CONFIG_DEBUG_INFO_BTF", warn=not btf))
    hdr = headers()
    add(Check("kernel headers", hdr.matches,
              f"{hdr.path} ({hdr.release}) " + ("match the kernel" if hdr.matches else
              f"do NOT match {platform.release()}: tracepoint fields only, no struct reads")
              if hdr.path else "missing", "bcc compiles every program against them",
              f"apt install linux-headers-{platform.release()} (or link the distro's headers)",
              warn=hdr.path is not None))
    for group in GROUPS:
        present = bool(root and (root / "events" / group).is_dir())
        add(Check(f"tracepoints {group}:*", present, "present" if present else "absent",
                  ", ".join(c for c, tps in COLLECTOR_TRACEPOINTS.items()
                            if any(g == group for g, _ in tps)) or "net (bridge FDB)",
                  "kernel built without these events", warn=group == "bridge"))
    flavour = kvm_flavour()
    for collector, tps in COLLECTOR_TRACEPOINTS.items():
        for group, name in tps:
            present = tracefs.tracepoint_exists(group, name)
            detail = "present" if present else "absent"
            if name in ("kvm_exit", "kvm_entry") and present and flavour == "pvm":
                detail = ("present but never emitted: this host's KVM is the PVM flavour "
                          "(/sys/module/kvm_pvm), which runs guests without trace_kvm_exit")
            add(Check(f"{group}:{name}", present and not (name in ("kvm_exit", "kvm_entry")
                                                          and flavour == "pvm"), detail, collector,
                      "needs a KVM host with VMX or SVM" if name in ("kvm_exit", "kvm_entry")
                      else "kernel built without this tracepoint",
                      warn=name in ("kvm_exit", "kvm_entry")))
    kp = has_kprobes()
    add(Check("kprobes", kp, "available" if kp else "absent (no kprobe PMU, no kprobe_events)",
              "net deep probes (tun/bridge functions)", "kernel needs CONFIG_KPROBES", warn=True))
    fe_ok, fe_detail = fentry_works() if priv else (False, "not tried without privileges")
    add(Check("fentry", fe_ok, fe_detail, "net deep probes (preferred over kprobes)",
              "kernel needs BPF trampolines (CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS) and BTF", warn=True))
    up = has_uprobes()
    add(Check("uprobes", up, "available" if up else "absent", "qemu (VMM function probes)",
              "kernel needs CONFIG_UPROBE_EVENTS", warn=True))
    kvm = os.path.exists("/dev/kvm")
    virt = ", ".join(sorted(cpu_virt_flags())) or "no vmx/svm in /proc/cpuinfo"
    add(Check("/dev/kvm", kvm, f"{'present' if kvm else 'absent'}; KVM flavour {flavour}; {virt}",
              "the built-in lab, and any VM on this host", "load kvm_intel or kvm_amd"))
    schedstats = kernel_config().get("CONFIG_SCHEDSTATS", "?")
    add(Check("schedstats", True, "CONFIG_SCHEDSTATS=" + schedstats +
              " (kvmbpf uses sched_wakeup/sched_switch, not sched_stat_*)", "steal", warn=True))
    rep.collectors = _collector_status(rep)
    return rep


def _collector_status(rep: Report) -> dict[str, str | None]:
    by_name = {c.name: c for c in rep.checks}
    base = [c for c in ("privileges", "bpf syscall", "tracefs") if not by_name[c].ok]
    if by_name["kernel headers"].detail == "missing":
        base.append("kernel headers")
    status: dict[str, str | None] = {}
    for collector, tps in COLLECTOR_TRACEPOINTS.items():
        required = tps[:3] if collector == "exits" else tps[:2]
        missing = [] if "tracefs" in base else [  # unreadable tracefs: no tracepoint is knowable
            f"{g}:{n}" for g, n in required if not tracefs.tracepoint_exists(g, n)]
        why = ", ".join(base + missing) or None
        status[collector] = f"needs {why}" if why else None
    status["qemu"] = None if by_name["uprobes"].ok and not base else "needs " + ", ".join(
        base + ([] if by_name["uprobes"].ok else ["uprobes"]))
    return status
