"""Shared fixtures: lab guests with unique names, running the CLI, probe-leak checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _needs_root_kvm() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF and the lab)"
    if not os.path.exists("/dev/kvm"):
        return "needs /dev/kvm"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _needs_root_kvm()
    for item in items:
        if reason and "e2e" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def lab():
    """A lab of our own (unique id), torn down after the test whatever happens."""
    from kvmbpf.lab.lab import Lab
    the_lab = Lab("t" + uuid.uuid4().hex[:6])
    try:
        yield the_lab
    finally:
        the_lab.down()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines() if line.startswith("{")]


def run_kvmbpf(*args: str, timeout: float = 120, check: bool = False) -> Result:
    """Run the real CLI in a child process (as an operator would)."""
    proc = subprocess.run([sys.executable, "-m", "kvmbpf", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    res = Result(proc)
    if check and res.rc != 0:
        raise AssertionError(f"kvmbpf {' '.join(args)} -> {res.rc}\n{res.err}")
    return res


def tracing_prog_ids() -> set[int]:
    """Ids of loaded tracing BPF programs (bpftool), to prove nothing is left attached."""
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True).stdout
    return {p["id"] for p in json.loads(out or "[]")
            if p.get("type") in ("tracepoint", "kprobe", "raw_tracepoint", "tracing", "perf_event")}


def process_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once pid no longer runs (gone, or a zombie waiting for init to reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def prog_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs one process holds (its fdinfo), exact while others load their own."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            text = info.read_text()
        except OSError:
            continue
        ids.update(int(line.split()[1]) for line in text.splitlines() if line.startswith("prog_id:"))
    return ids


def _prog_holders() -> dict[int, set[int]]:
    """BPF program id -> pids holding an fd to it (from every process's fdinfo)."""
    holders: dict[int, set[int]] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        for prog in prog_ids_of(int(pid_dir.name)):
            holders.setdefault(prog, set()).add(int(pid_dir.name))
    return holders


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def leaked_probes(before: set[int]) -> set[int]:
    """New tracing programs that are ours: held by this process or its children, or by nobody.

    Programs held by unrelated live processes (another tool, another test run on the
    same host) are theirs and are not counted.
    """
    me = os.getpid()
    holders = _prog_holders()
    leaked = set()
    for prog in tracing_prog_ids() - before:
        owners = holders.get(prog, set())
        if not owners or any(pid == me or _parent(pid) == me for pid in owners):
            leaked.add(prog)
    return leaked


@pytest.fixture
def no_leaked_probes():
    """Fails the test if it leaves a tracing BPF program loaded (waits for lazy frees)."""
    before = tracing_prog_ids()
    yield
    deadline = time.monotonic() + 15
    while (leaked := leaked_probes(before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leaked, f"BPF programs left loaded: {sorted(leaked)}"
