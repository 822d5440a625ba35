"""Start one lab guest under QEMU/KVM and follow its progress through its serial port."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KvmbpfError
from . import guests
from .resources import stop_pid

BOOT_TRIES = 3


@dataclass
class LabVM:
    name: str
    pid: int
    serial: str
    guest: str
    params: dict[str, int]
    disk: str | None = None
    tap: str | None = None
    netns: str | None = None
    boots: int = 1
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def markers(self) -> list[str]:
        """The guest's progress lines so far ("ready", "begin", "end", "done", ...)."""
        try:
            text = Path(self.serial).read_text(errors="replace")
        except OSError:
            return []
        return [line[len("KVMBPF:"):] for line in text.splitlines() if line.startswith("KVMBPF:")]

    def wait_for(self, marker: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.markers().count(marker) >= count:
                return
            if not self.alive():
                raise KvmbpfError(f"lab guest {self.name} exited before '{marker}' x{count}")
            time.sleep(0.05)
        raise KvmbpfError(f"lab guest {self.name}: no '{marker}' x{count} within {timeout:g}s")

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return Path(f"/proc/{self.pid}").exists()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            stop_pid(self.pid)
            self._proc.wait()
        elif self._proc is None:
            stop_pid(self.pid)


def qemu_command(name: str, image: Path, serial: Path, disk: str | None, tap: str | None,
                 mac: str | None, memory_mb: int) -> list[str]:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise KvmbpfError("qemu-system-x86_64 is not installed (apt install qemu-system-x86)")
    cmd = [exe, "-accel", "kvm", "-cpu", "qemu64", "-m", str(memory_mb), "-smp", "1",
           "-name", f"guest={name},debug-threads=on", "-nodefaults", "-vga", "none",
           "-display", "none", "-no-reboot", "-monitor", "none",
           "-chardev", f"file,id=ser0,path={serial}", "-serial", "chardev:ser0",
           "-drive", f"file={image},if=none,id=boot,format=raw,snapshot=on",
           "-device", "ide-hd,drive=boot,bootindex=0"]
    if disk:
        cmd += ["-drive", f"file={disk},if=none,id=data,format=raw,cache=none,aio=threads",
                "-device", "virtio-blk-pci,drive=data,bootindex=1"]
    if tap:
        cmd += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=,disable-modern=on"]
    return cmd


def start(name: str, guest: str, params: dict[str, int], workdir: Path, *, disk: str | None = None,
          tap: str | None = None, netns: str | None = None, mac: str = "52:54:00:12:34:56",
          memory_mb: int = 32, wait_ready: float = 60.0) -> LabVM:
    """Boot a guest; retry when QEMU shuts down during SeaBIOS (seen ~1 boot in 20 here)."""
    if not os.path.exists("/dev/kvm"):
        raise KvmbpfError("/dev/kvm is missing: the lab needs KVM")
    image = guests.build(guest, params)
    workdir.mkdir(parents=True, exist_ok=True)
    serial = workdir / f"{name}.serial"
    log = workdir / f"{name}.qemu.log"
    last_error = ""
    for attempt in range(1, BOOT_TRIES + 1):
        serial.unlink(missing_ok=True)
        cmd = qemu_command(name, image, serial, disk, tap, mac, memory_mb)
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                    start_new_session=True)
        vm = LabVM(name, proc.pid, str(serial), guest, dict(params), disk, tap, netns,
                   attempt, proc)
        try:
            vm.wait_for("ready", timeout=wait_ready)
            return vm
        except KvmbpfError as exc:
            last_error = f"{exc}; {log.read_text(errors='replace').strip()[-300:]}"
            vm.stop()
    raise KvmbpfError(f"lab guest {name} did not boot in {BOOT_TRIES} tries: {last_error}")
