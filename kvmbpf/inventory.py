"""Host inventory: the KVM VMs on this host, their vCPU and other threads, taps and disks.

A VM is any process holding a KVM VM file descriptor (anon_inode:kvm-vm), not
only processes named qemu.  Collectors use the inventory to fill the in-kernel
filter maps (ids) and to label what they read (names); it is cheap enough to
rescan every interval so VMs may come and go while tracing.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KvmbpfError

_VCPU_NAME_RE = re.compile(r"^CPU (\d+)/KVM$")
_VCPU_FD_RE = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")


def kernel_dev(major: int, minor: int) -> int:
    """dev_t as the kernel's tracepoints print it (MAJOR << 20 | MINOR)."""
    return (major << 20) | minor


@dataclass(frozen=True)
class Thread:
    tid: int
    comm: str
    vcpu: int | None = None     # vCPU index, None for the VMM's other threads


@dataclass(frozen=True)
class Tap:
    name: str
    bridge: str | None = None
    netns: str | None = None    # None: the same network namespace as kvmbpf


@dataclass(frozen=True)
class Disk:
    path: str                   # what the VMM opened
    major: int                  # the block device that serves the I/O
    minor: int
    backing: str | None = None  # for a loop device: its backing file

    @property
    def dev(self) -> int:
        return kernel_dev(self.major, self.minor)

    @property
    def devname(self) -> str:
        return block_device_name(self.major, self.minor)


@dataclass
class VM:
    pid: int
    name: str
    vmm: str
    threads: list[Thread] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)

    @property
    def vcpus(self) -> list[Thread]:
        return sorted((t for t in self.threads if t.vcpu is not None), key=lambda t: t.vcpu)

    def to_dict(self) -> dict:
        return {
            "pid": self.pid, "name": self.name, "vmm": self.vmm,
            "vcpus": [{"index": t.vcpu, "tid": t.tid} for t in self.vcpus],
            "threads": [{"tid": t.tid, "comm": t.comm} for t in self.threads if t.vcpu is None],
            "taps": [{"name": t.name, "bridge": t.bridge, "netns": t.netns} for t in self.taps],
            "disks": [{"path": d.path, "device": f"{d.major}:{d.minor}", "devname": d.devname,
                       "backing": d.backing} for d in self.disks],
        }


@dataclass
class Inventory:
    vms: list[VM]

    def by_pid(self) -> dict[int, VM]:
        return {vm.pid: vm for vm in self.vms}

    def by_tid(self) -> dict[int, tuple[VM, Thread]]:
        return {t.tid: (vm, t) for vm in self.vms for t in vm.threads}

    def select(self, names: tuple[str, ...] = (), pids: tuple[int, ...] = ()) -> list[VM]:
        """The VMs named or given by pid (all when neither); unknown ones are an error."""
        if not names and not pids:
            return list(self.vms)
        chosen: list[VM] = []
        for name in names:
            match = [vm for vm in self.vms if vm.name == name]
            if not match:
                known = ", ".join(sorted(vm.name for vm in self.vms)) or "none"
                raise KvmbpfError(f"no VM named {name!r} on this host (VMs: {known})")
            chosen += match
        for pid in pids:
            vm = self.by_pid().get(pid)
            if vm is None:
                raise KvmbpfError(f"process {pid} is not a KVM VM")
            chosen.append(vm)
        return list({vm.pid: vm for vm in chosen}.values())


def scan(proc: str = "/proc", sys: str = "/sys") -> Inventory:
    """Find every VM on the host."""
    vms = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        vm = _scan_process(Path(proc), int(entry.name), Path(sys))
        if vm is not None:
            vms.append(vm)
    return Inventory(sorted(vms, key=lambda v: v.pid))


def _fd_links(proc: Path, pid: int) -> dict[int, str]:
    fd_dir = proc / str(pid) / "fd"
    links = {}
    try:
        for entry in os.scandir(fd_dir):
            try:
                links[int(entry.name)] = os.readlink(entry.path)
            except OSError:
                continue
    except OSError:
        return {}
    return links


def _scan_process(proc: Path, pid: int, sys: Path) -> VM | None:
    links = _fd_links(proc, pid)
    if "anon_inode:kvm-vm" not in links.values():
        return None
    cmdline = read_text(proc / str(pid) / "cmdline").split("\0")
    comm = read_text(proc / str(pid) / "comm").strip()
    try:
        vmm = os.readlink(proc / str(pid) / "exe")
    except OSError:
        vmm = cmdline[0] if cmdline and cmdline[0] else comm
    name = vm_name(cmdline) or f"{comm or 'vm'}-{pid}"
    threads = _threads(proc, pid, links)
    return VM(pid, name, vmm, threads, _taps(proc, pid, links, sys), _disks(links, sys))


def vm_name(argv: list[str]) -> str | None:
    """The VM name from a QEMU command line: `-name guest=X,...` or `-name X`."""
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[i + 1]
            parts = _split_qemu_opts(value)
            for part in parts:
                if part.startswith("guest="):
                    return part[len("guest="):]
            if parts and "=" not in parts[0]:
                return parts[0]
    return None


def _split_qemu_opts(value: str) -> list[str]:
    """Split QEMU's key=value,... option syntax (',,' escapes a comma)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    return parts


def _threads(proc: Path, pid: int, links: dict[int, str]) -> list[Thread]:
    vcpu_fds = {fd: int(m.group(1)) for fd, target in links.items()
                if (m := _VCPU_FD_RE.match(target))}
    threads = []
    try:
        tids = sorted(int(t) for t in os.listdir(proc / str(pid) / "task"))
    except OSError:
        return []
    comms = {tid: read_text(proc / str(pid) / "task" / str(tid) / "comm").strip() for tid in tids}
    named = {tid: int(m.group(1)) for tid, comm in comms.items()
             if (m := _VCPU_NAME_RE.match(comm))}
    for tid, comm in comms.items():
        vcpu = named.get(tid) if named else _vcpu_from_syscall(proc, pid, tid, vcpu_fds)
        threads.append(Thread(tid, comm, vcpu))
    return threads


def _vcpu_from_syscall(proc: Path, pid: int, tid: int, vcpu_fds: dict[int, int]) -> int | None:
    """Without QEMU's thread names: a thread inside ioctl(vcpu_fd, KVM_RUN) is that vCPU.

    /proc/<pid>/task/<tid>/syscall shows the blocked syscall and its arguments;
    a vCPU that is running guest code at that instant shows 'running' and is missed.
    """
    if not vcpu_fds:
        return None
    fields = read_text(proc / str(pid) / "task" / str(tid) / "syscall").split()
    if len(fields) >= 3 and fields[0] == "16" and fields[2] == "0xae80":
        return vcpu_fds.get(int(fields[1], 16))
    return None


def _netns_id(proc: Path, pid: int) -> str | None:
    try:
        return os.readlink(proc / str(pid) / "ns" / "net")
    except OSError:
        return None


def _taps(proc: Path, pid: int, links: dict[int, str], sys: Path) -> list[Tap]:
    names = []
    for fd, target in links.items():
        if target != "/dev/net/tun":
            continue
        for line in read_text(proc / str(pid) / "fdinfo" / str(fd)).splitlines():
            if line.startswith("iff:"):
                names.append(line.split(":", 1)[1].strip())
    if not names:
        return []
    ns = _netns_id(proc, pid)
    foreign = ns is not None and ns != _netns_id(proc, os.getpid()) and proc == Path("/proc")
    masters = _masters_in_netns(pid) if foreign else {}
    taps = []
    for name in dict.fromkeys(names):
        if foreign:
            bridge = masters.get(name)
        else:
            master = sys / "class" / "net" / name / "master"
            bridge = os.path.basename(os.readlink(master)) if master.is_symlink() else None
        taps.append(Tap(name, bridge, ns if foreign else None))
    return taps


def _masters_in_netns(pid: int) -> dict[str, str]:
    """Interface -> bridge inside another process's network namespace (via netlink)."""
    try:
        out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-j", "link", "show"],
                             capture_output=True, text=True, timeout=5, check=False).stdout
        return {link["ifname"]: link["master"] for link in json.loads(out or "[]")
                if "master" in link}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}


def _disks(links: dict[int, str], sys: Path) -> list[Disk]:
    disks: dict[tuple[int, int], Disk] = {}
    for target in links.values():
        if not target.startswith("/") or target.startswith(("/dev/net/", "/dev/kvm", "/proc/",
                                                            "/dev/pts", "/dev/null", "/sys/")):
            continue
        try:
            st = os.stat(target)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISREG(st.st_mode) and _is_disk_image(target):
            major, minor = os.major(st.st_dev), os.minor(st.st_dev)
        else:
            continue
        backing = read_text(sys / "dev" / "block" / f"{major}:{minor}" / "loop" / "backing_file").strip()
        disks.setdefault((major, minor), Disk(target, major, minor, backing or None))
    return list(disks.values())


def _is_disk_image(path: str) -> bool:
    """Regular files a VMM keeps open that are disk images (not logs, sockets, libraries)."""
    return path.endswith((".img", ".raw", ".qcow2", ".qcow", ".vmdk", ".vdi", ".iso", ".bin"))


def block_device_name(major: int, minor: int, sys: str = "/sys") -> str:
    """sda, loop3, dm-0... from /sys/dev/block (major:minor when unknown)."""
    uevent = read_text(Path(sys) / "dev" / "block" / f"{major}:{minor}" / "uevent")
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return line.split("=", 1)[1]
    return f"{major}:{minor}"


def bio_only_devices(sys: str = "/sys") -> list[tuple[int, int]]:
    """(major, minor) of block devices (and their partitions) that complete bios themselves:
    no blk-mq queue (`mq`) and nothing under them (`slaves`) to pass bios on to — zram, brd,
    pmem.  Their bios never become requests, so no request tracepoint ever ends them."""
    out = []
    for link in sorted((Path(sys) / "dev" / "block").glob("*:*")):
        major, minor = (int(n) for n in link.name.split(":"))
        disk = disk_sysdir(major, minor, sys)
        if not (disk / "mq").exists() and not any((disk / "slaves").glob("*")):
            out.append((major, minor))
    return out


def disk_sysdir(major: int, minor: int, sys: str = "/sys") -> Path:
    """The sysfs directory of the whole disk a block device is (a partition's parent)."""
    sysdir = (Path(sys) / "dev" / "block" / f"{major}:{minor}").resolve()
    return sysdir.parent if (sysdir / "partition").exists() else sysdir


def read_text(path: str | Path) -> str:
    """A /proc or /sys file's text, "" if it is gone or unreadable (processes and devices
    come and go between listing and reading)."""
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""
