"""Host resources the lab makes (loop devices, network namespaces) and removes again.

Every creator returns an object that knows how to undo exactly what it made,
so `lab down` and the tests remove only their own things.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvmbpfError


def sh(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise KvmbpfError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one process we started; reap it if it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _alive(pid):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class LoopDisk:
    """A file-backed loop device with direct I/O: real block requests for a lab guest."""
    device: str
    backing: str

    @classmethod
    def create(cls, workdir: Path, name: str, size_mb: int = 16) -> "LoopDisk":
        backing = workdir / f"{name}.disk"
        with open(backing, "wb") as fh:
            fh.truncate(size_mb << 20)
        device = sh("losetup", "--find", "--show", "--direct-io=on", str(backing)).strip()
        return cls(device, str(backing))

    def destroy(self) -> None:
        sh("losetup", "-d", self.device, check=False)
        Path(self.backing).unlink(missing_ok=True)
