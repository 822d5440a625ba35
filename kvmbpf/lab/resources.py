"""Host resources the lab makes (loop devices, network namespaces) and removes again.

Every creator returns an object that knows how to undo exactly what it made,
so `lab down` and the tests remove only their own things.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import KvmbpfError
from ..inventory import disk_sysdir, read_text


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

    def whole_disk(self) -> tuple[str, str]:
        """(name, major:minor) of the disk holding the backing file (cgroup I/O limits are
        per disk)."""
        dev = os.stat(self.backing).st_dev
        sysdir = disk_sysdir(os.major(dev), os.minor(dev))
        return sysdir.name, read_text(sysdir / "dev").strip()


CGROUP_V1_BLKIO = Path("/sys/fs/cgroup/blkio")
CGROUP_V2 = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def io_throttle(disk: str, iops: int) -> Iterator[Path]:
    """A block cgroup allowing `iops` reads and writes per second on `disk` (major:minor),
    as a cloud volume's IOPS limit would; the caller moves processes into it (write a pid to
    its cgroup.procs).  On exit they go back to the root cgroup and the group is removed."""
    if (CGROUP_V1_BLKIO / "blkio.throttle.read_iops_device").exists():
        root, limits = CGROUP_V1_BLKIO, {"blkio.throttle.read_iops_device": f"{disk} {iops}",
                                         "blkio.throttle.write_iops_device": f"{disk} {iops}"}
    elif "io" in read_text(CGROUP_V2 / "cgroup.subtree_control").split():
        root, limits = CGROUP_V2, {"io.max": f"{disk} riops={iops} wiops={iops}"}
    else:
        raise KvmbpfError("no block cgroup controller to throttle with (cgroup v1 blkio, or v2 "
                          "with io enabled in /sys/fs/cgroup/cgroup.subtree_control)")
    group = root / f"kvmbpf-io{uuid.uuid4().hex[:6]}"
    group.mkdir()
    try:
        for name, value in limits.items():
            (group / name).write_text(value)
        yield group
    finally:
        for member in read_text(group / "cgroup.procs").split():
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(member)
        group.rmdir()

