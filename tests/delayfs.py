"""A FUSE file system with one file whose every read and write takes a fixed delay.

A loop device over that file is a block device with a known, steady service time: each
request's I/O to the backing file goes to this process (FUSE writes are write-through:
the kernel waits for the reply) and is answered after DELAY.  Tests use it as a
ground truth for latency that does not come from kvmbpf; fio's completion latency on it is
the delay plus the syscall's own few tens of microseconds.

Run: python tests/delayfs.py MOUNTPOINT DELAY_MS SIZE_MB  (foreground; umount to stop).
"""
from __future__ import annotations

import errno
import stat
import sys
import time

import fusepy

NAME = "disk"


class DelayFS(fusepy.Operations):
    """/disk: SIZE bytes in memory, each read/write answered after `delay` seconds."""

    def __init__(self, delay: float, size: int):
        self.delay = delay
        self.data = bytearray(size)
        self.started = time.time()

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != "/" + NAME:
            raise fusepy.FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": len(self.data),
                "st_mtime": self.started, "st_ctime": self.started, "st_atime": self.started}

    def readdir(self, path, fh):
        return [".", "..", NAME]

    def read(self, path, size, offset, fh):
        time.sleep(self.delay)
        return bytes(self.data[offset:offset + size])

    def write(self, path, data, offset, fh):
        time.sleep(self.delay)
        end = min(offset + len(data), len(self.data))
        self.data[offset:end] = data[:end - offset]
        return len(data)

    def truncate(self, path, length, fh=None):
        return 0

    def fsync(self, path, datasync, fh):
        return 0


def main() -> None:
    mountpoint, delay_ms, size_mb = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    fusepy.FUSE(DelayFS(delay_ms / 1000, size_mb << 20), mountpoint, foreground=True,
                direct_io=True, allow_other=False)


if __name__ == "__main__":
    main()
