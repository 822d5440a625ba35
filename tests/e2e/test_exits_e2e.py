"""kvmbpf exits against a real lab guest whose exit mix is known.

The window is made exact by freezing the guest: QEMU is stopped (SIGSTOP)
between the workload's rounds 1 and 2, the tracefs ground truth and then
kvmbpf attach while nothing runs, the guest resumes for round 2, and both
are read after the guest halted for good ('done': cli; hlt).  So round 2's
PIO/MMIO counts are exact, and exits to the VMM (which also come from BIOS
timer polling during DELAY_MS) match a tracefs count over the same window.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_kvmbpf, unique

#: The BPF functions of bpf_programs/exits.bpf.c, as bpftool names them.
EXITS_PROGS = {"tracepoint__kvm__kvm_exit", "tracepoint__kvm__kvm_entry",
               "tracepoint__kvm__kvm_userspace_exit", "tracepoint__raw_syscalls__sys_enter",
               "tracepoint__kvm__kvm_pio", "tracepoint__kvm__kvm_mmio"}

TRACEFS = Path("/sys/kernel/tracing")
PIO_COUNT, PIC_COUNT, MMIO_COUNT = 321, 77, 45
PARAMS = {"PIO_COUNT": PIO_COUNT, "PIC_COUNT": PIC_COUNT, "MMIO_COUNT": MMIO_COUNT,
          "ROUNDS": 2, "DELAY_MS": 1500}
KVM_EXIT_IO, KVM_EXIT_MMIO = 2, 6


class TracefsTruth:
    """kvm_userspace_exit and kvm_exit of one thread, recorded by a private tracefs instance."""

    def __init__(self, tid: int):
        self.dir = TRACEFS / "instances" / f"kvmbpf-exits-{uuid.uuid4().hex[:8]}"
        self.tid = tid

    def __enter__(self) -> "TracefsTruth":
        self.dir.mkdir()
        (self.dir / "buffer_size_kb").write_text("8192")
        for event in ("kvm_userspace_exit", "kvm_exit"):
            (self.dir / "events/kvm" / event / "filter").write_text(f"common_pid == {self.tid}")
            (self.dir / "events/kvm" / event / "enable").write_text("1")
        return self

    def stop(self) -> str:
        (self.dir / "tracing_on").write_text("0")
        return (self.dir / "trace").read_text()

    def __exit__(self, *exc) -> None:
        for event in ("kvm_userspace_exit", "kvm_exit"):
            (self.dir / "events/kvm" / event / "enable").write_text("0")
        self.dir.rmdir()


def parse_truth(text: str) -> tuple[Counter, int]:
    """(userspace exits by (reason code, errno sign), kvm_exit count) from a trace; asserts nothing was lost."""
    m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
    assert m and m.group(1) == m.group(2), "tracefs ground truth lost events"
    users: Counter = Counter()
    for code in re.findall(r"kvm_userspace_exit: reason \S+ \((-?\d+)\)", text):
        users[int(code)] += 1
    return users, len(re.findall(r" kvm_exit: ", text))


def exits_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True).stdout
    return {p["id"] for p in json.loads(out or "[]") if p.get("name", "") in
            {n[:15] for n in EXITS_PROGS} | EXITS_PROGS}


@pytest.fixture
def no_leaked_probes():
    """Like conftest's, but for this program's probes only, and patient: on this shared host
    other users' short runs (kvmbpf top/export load exits.bpf.c too) come and go meanwhile."""
    before = exits_prog_ids()
    yield
    deadline = time.monotonic() + 30
    while (leaked := exits_prog_ids() - before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not leaked, f"exits BPF programs left loaded: {sorted(leaked)}"


def vcpu0_tid(pid: int) -> int:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "CPU 0/KVM":
            return int(task.name)
    raise AssertionError("no 'CPU 0/KVM' thread")


class Lines:
    """A child's stdout as lines, each waited for with a timeout (no buffering surprises)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.buf = proc, b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            assert chunk, f"kvmbpf exits printed no line in {timeout}s (rc {self.proc.poll()})"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def rest(self) -> list[str]:
        self.buf += self.proc.stdout.read()
        return self.buf.decode().splitlines()


def total(lines: list[dict], view: str, **match) -> int:
    return sum(r["count"] for line in lines for r in line[view]
               if all(r[k] == v for k, v in match.items()))


@pytest.fixture
def frozen_round(lab):
    """A guest stopped after round 1 of 2; yields (vm, vcpu tid)."""
    vm = lab.start_vm(unique("tex"), "exits", PARAMS)
    vm.wait_for("end", 1, timeout=30)
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        assert vm.markers().count("begin") == 1, "round 2 began before the guest was frozen"
        yield vm, vcpu0_tid(vm.pid)
    finally:
        os.kill(vm.pid, signal.SIGCONT)


def test_counts_match_workload_and_tracefs(frozen_round, no_leaked_probes):
    vm, tid = frozen_round
    with TracefsTruth(tid) as truth:
        proc = subprocess.Popen([sys.executable, "-m", "kvmbpf", "exits", "0.5", "--json", "--vm", vm.name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        out = Lines(proc)
        try:
            lines = [out.next(60)]                   # printed: the probes are attached
            os.kill(vm.pid, signal.SIGCONT)
            vm.wait_for("done", timeout=60)
            time.sleep(0.3)
            # Ctrl-C mid-run: the partial interval is printed and every probe detaches.  Sent
            # right after an interval was printed, so it lands in the wait between intervals.
            lines.append(out.next(30))
            proc.send_signal(signal.SIGINT)
            lines += out.rest()
            err = proc.stderr.read().decode()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        users, kvm_exits = parse_truth(truth.stop())
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(lines) >= 3

    assert total(lines, "pio", port=0x700, direction="out") == PIO_COUNT
    assert total(lines, "pio", port=0x21, direction="out") == PIC_COUNT
    assert total(lines, "mmio", gpa=0x80000000, access="write") == MMIO_COUNT

    rows = [r for line in lines for r in line["userspace_exits"]]
    assert rows and all((r["vm"], r["vcpu"], r["tid"]) == (vm.name, 0, tid) for r in rows)
    assert total(lines, "userspace_exits", reason="KVM_EXIT_IO") == users[KVM_EXIT_IO]
    assert total(lines, "userspace_exits", reason="KVM_EXIT_MMIO") == users[KVM_EXIT_MMIO] == MMIO_COUNT
    assert total(lines, "userspace_exits") == sum(users.values())
    vmm = sum(r["vmm_time"]["count"] for r in rows)
    assert sum(users.values()) - 1 <= vmm <= sum(users.values())
    assert all(r["vmm_time"]["p50"] > 0 for r in rows if r["vmm_time"]["count"])

    if kvm_exits == 0:
        assert lines[-1]["kvm_exit"] == "not-emitted"
        assert any("does not emit kvm:kvm_exit" in n for n in lines[-1]["notes"])
        assert total(lines, "exits") == 0
    else:
        assert total(lines, "exits") == kvm_exits


def test_table_output_names_vm_and_explains_missing_kvm_exit(lab, no_leaked_probes, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")       # rich would shorten cells to 80 columns
    vm = lab.start_vm(unique("tex"), "exits", {"PIO_COUNT": 50, "ROUNDS": 0, "DELAY_MS": 50})
    res = run_kvmbpf("exits", "-d", "1.5", "--vm", vm.name, "--vcpu", "0")
    assert res.rc == 0, res.err
    assert vm.name in res.out and "0x700" in res.out
    assert re.search(rf"{vm.name} +│ 0 +│ {vcpu0_tid(vm.pid)} +│ IO ", res.out), res.out
    assert "idle exits" in res.out
    if Path("/sys/module/kvm_pvm").exists():
        assert "does not emit kvm:kvm_exit" in res.out


@pytest.mark.parametrize("args, needle", [
    (("--vm", "no-such-vm-xyz"), "no VM named"),
    (("0",), "interval must be > 0"),
    (("1", "0"), "count must be > 0"),
    (("--alert-rate", "0"), "--alert-rate must be > 0"),
])
def test_bad_input_is_one_line_exit_2(args, needle, no_leaked_probes):
    res = run_kvmbpf("exits", *args, "-d", "1")
    assert res.rc == 2 and needle in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1


def test_unknown_vcpu_is_one_line_exit_2(lab, no_leaked_probes):
    vm = lab.start_vm(unique("tex"), "exits", {"ROUNDS": 1})
    res = run_kvmbpf("exits", "--vm", vm.name, "--vcpu", "7", "-d", "1")
    assert res.rc == 2 and "no vCPU 7" in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1
