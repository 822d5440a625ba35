"""Fake /proc trees for inventory tests and benchmarks."""
import os
from pathlib import Path


def make_proc(root: Path, pid: int, argv: list[str], threads: dict[int, str], fds: dict[int, str],
              fdinfo: dict[int, str] | None = None, syscalls: dict[int, str] | None = None):
    p = root / str(pid)
    (p / "fd").mkdir(parents=True)
    (p / "fdinfo").mkdir()
    (p / "cmdline").write_bytes(("\0".join(argv) + "\0").encode())
    (p / "comm").write_text(Path(argv[0]).name[:15] + "\n")
    for tid, comm in threads.items():
        (p / "task" / str(tid)).mkdir(parents=True)
        (p / "task" / str(tid) / "comm").write_text(comm + "\n")
        if syscalls and tid in syscalls:
            (p / "task" / str(tid) / "syscall").write_text(syscalls[tid] + "\n")
    for fd, target in fds.items():
        os.symlink(target, p / "fd" / str(fd))
    for fd, text in (fdinfo or {}).items():
        (p / "fdinfo" / str(fd)).write_text(text)
