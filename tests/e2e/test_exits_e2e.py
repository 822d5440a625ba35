"""kvmbpf exits against a real lab guest whose exit mix is known.

The window is made exact by freezing the guest: QEMU is stopped (SIGSTOP)
between the workload's rounds 1 and 2, the tracefs ground truth and then
kvmbpf attach while nothing runs, the guest resumes for round 2, and both
are read after the guest halted for good ('done': cli; hlt).  So round 2's
PIO/MMIO counts are exact, and exits to the VMM (which also come from BIOS
timer polling during DELAY_MS) match a tracefs count over the same window.
The same window checks emulated instructions: this host emulates all real-mode
code (the lab guest's and SeaBIOS's), so the whole instruction mix must match
tracefs, and round 2's CR0 writes the workload's count.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from kvmbpf.collectors.base import Scope
from kvmbpf.collectors.exits import ExitsCollector, Slots
from tests.conftest import ROOT, run_kvmbpf, unique

#: The BPF functions of bpf_programs/exits.bpf.c, as bpftool names them.
EXITS_PROGS = {"tracepoint__kvm__kvm_exit", "tracepoint__kvm__kvm_entry",
               "tracepoint__kvm__kvm_userspace_exit", "tracepoint__raw_syscalls__sys_enter",
               "tracepoint__kvm__kvm_pio", "tracepoint__kvm__kvm_mmio",
               "tracepoint__kvm__kvm_emulate_insn"}

TRACEFS = Path("/sys/kernel/tracing")
PIO_COUNT, PIC_COUNT, MMIO_COUNT = 321, 77, 45
PARAMS = {"PIO_COUNT": PIO_COUNT, "PIC_COUNT": PIC_COUNT, "MMIO_COUNT": MMIO_COUNT,
          "ROUNDS": 2, "DELAY_MS": 1500}
KVM_EXIT_IO, KVM_EXIT_MMIO = 2, 6


class TracefsTruth:
    """kvm events of one thread (by default kvm_userspace_exit and kvm_exit), recorded by a
    private tracefs instance."""

    def __init__(self, tid: int, events: tuple[str, ...] = ("kvm_userspace_exit", "kvm_exit"),
                 buffer_kb: int = 8192):
        self.dir = TRACEFS / "instances" / f"kvmbpf-exits-{uuid.uuid4().hex[:8]}"
        self.tid, self.events, self.buffer_kb = tid, events, buffer_kb

    def __enter__(self) -> "TracefsTruth":
        self.dir.mkdir()
        (self.dir / "buffer_size_kb").write_text(str(self.buffer_kb))
        for event in self.events:
            (self.dir / "events/kvm" / event / "filter").write_text(f"common_pid == {self.tid}")
            (self.dir / "events/kvm" / event / "enable").write_text("1")
        return self

    def stop(self) -> str:
        (self.dir / "tracing_on").write_text("0")
        return (self.dir / "trace").read_text()

    def __exit__(self, *exc) -> None:
        for event in self.events:
            (self.dir / "events/kvm" / event / "enable").write_text("0")
        self.dir.rmdir()


def assert_nothing_lost(text: str) -> None:
    m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
    assert m and m.group(1) == m.group(2), "tracefs ground truth lost events"


def parse_truth(text: str) -> tuple[Counter, int]:
    """(userspace exits by (reason code, errno sign), kvm_exit count) from a trace; asserts nothing was lost."""
    assert_nothing_lost(text)
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
    """A child's stdout as lines, each waited for with a timeout.  A thread drains the pipe all
    the time: a JSON line can be tens of KiB (emulated instructions), and a CLI blocked writing
    into a full pipe when Ctrl-C comes would end without its last, partial interval."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.buf = proc, b""
        self.chunks: queue.Queue[bytes] = queue.Queue()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.chunks.put(chunk)
        self.chunks.put(b"")

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            try:
                chunk = self.chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                chunk = b""
            assert chunk, f"kvmbpf exits printed no line in {timeout}s (rc {self.proc.poll()})"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def rest(self) -> list[str]:
        self.reader.join(timeout=60)
        while not self.chunks.empty():
            self.buf += self.chunks.get()
        return self.buf.decode().splitlines()


def total(lines: list[dict], view: str, **match) -> int:
    return sum(r["count"] for line in lines for r in line[view]
               if all(r[k] == v for k, v in match.items()))


@contextlib.contextmanager
def frozen_after_round1(lab, params: dict[str, int]):
    """A guest (2 rounds) stopped after round 1; yields (vm, vcpu tid)."""
    vm = lab.start_vm(unique("tex"), "exits", params)
    vm.wait_for("end", 1, timeout=30)
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        assert vm.markers().count("begin") == 1, "round 2 began before the guest was frozen"
        yield vm, vcpu0_tid(vm.pid)
    finally:
        os.kill(vm.pid, signal.SIGCONT)


@pytest.fixture
def frozen_round(lab):
    with frozen_after_round1(lab, PARAMS) as frozen:
        yield frozen


def trace_round2(vm, *args: str) -> list[dict]:
    """Run `kvmbpf exits --json ARGS` over the frozen guest's resumed round 2 up to 'done', end
    it with Ctrl-C; its JSON lines (asserts it exited 0)."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmbpf", "exits", "0.5", "--json", "--vm", vm.name,
                             *args],
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
    assert proc.returncode == 0, err
    return [json.loads(line) for line in lines if line.startswith("{")]


def assert_count(counted: int, truth: int, missed: int) -> None:
    """Exact, unless the kernel kept events from the program (recursion guard): then short by
    at most that many (`missed` covers every probe of the program, traced or not)."""
    assert truth - missed <= counted <= truth, (counted, truth, missed)


def test_counts_match_workload_and_tracefs(frozen_round, no_leaked_probes):
    vm, tid = frozen_round
    with TracefsTruth(tid) as truth:
        lines = trace_round2(vm)
        users, kvm_exits = parse_truth(truth.stop())
    assert len(lines) >= 3
    missed = sum(line["missed"] for line in lines)

    assert_count(total(lines, "pio", port=0x700, direction="out"), PIO_COUNT, missed)
    assert_count(total(lines, "pio", port=0x21, direction="out"), PIC_COUNT, missed)
    assert_count(total(lines, "mmio", gpa=0x80000000, access="write"), MMIO_COUNT, missed)

    rows = [r for line in lines for r in line["userspace_exits"]]
    assert rows and all((r["vm"], r["vcpu"], r["tid"]) == (vm.name, 0, tid) for r in rows)
    assert_count(total(lines, "userspace_exits", reason="KVM_EXIT_IO"), users[KVM_EXIT_IO], missed)
    assert users[KVM_EXIT_MMIO] == MMIO_COUNT
    assert_count(total(lines, "userspace_exits", reason="KVM_EXIT_MMIO"), MMIO_COUNT, missed)
    assert_count(total(lines, "userspace_exits"), sum(users.values()), missed)
    vmm = sum(r["vmm_time"]["count"] for r in rows)
    assert sum(users.values()) - 1 - missed <= vmm <= sum(users.values())
    assert all(r["vmm_time"]["p50"] > 0 for r in rows if r["vmm_time"]["count"])

    if kvm_exits == 0:
        assert lines[-1]["kvm_exit"] == "not-emitted"
        assert any("does not emit kvm:kvm_exit" in n for n in lines[-1]["notes"])
        assert total(lines, "exits") == 0
    else:
        assert_count(total(lines, "exits"), kvm_exits, missed)


CR0_COUNT = 3000
#: Round 2 of this guest only switches modes; its DELAY_MS waits are SeaBIOS code, emulated too.
CR0_PARAMS = {"CR0_COUNT": CR0_COUNT, "ROUNDS": 2, "DELAY_MS": 200}
def test_no_emulated_leaves_emulation_untraced(frozen_round, no_leaked_probes):
    """--no-emulated: the guest's emulated instructions (tracefs) show in no view, and the other
    counts stay exact."""
    vm, tid = frozen_round
    with TracefsTruth(tid, ("kvm_userspace_exit", "kvm_emulate_insn")) as truth:
        lines = trace_round2(vm, "--no-emulated")
        text = truth.stop()
    missed = sum(line["missed"] for line in lines)
    if Path("/sys/module/kvm_pvm").exists():
        assert "kvm_emulate_insn" in text             # there was emulation to leave out
    assert all(line["emulated"] == [] and line["emulated_insns"] == [] for line in lines)
    assert all(any("emulated instructions not traced" in n for n in line["notes"]) for line in lines)
    assert_count(total(lines, "pio", port=0x700, direction="out"), PIO_COUNT, missed)
    assert_count(total(lines, "mmio", gpa=0x80000000, access="write"), MMIO_COUNT, missed)
    assert_count(total(lines, "userspace_exits", reason="KVM_EXIT_MMIO"), MMIO_COUNT, missed)


_EMULATE_RE = re.compile(r"kvm_emulate_insn: ([0-9a-f]+):[0-9a-f]+:([0-9a-f ]*) \((\w+)\)( failed)?$")


def emulated_truth(text: str) -> tuple[Counter, int]:
    """From a kvm_emulate_insn trace: events by (first bytes as kvmbpf shows them, mode, failed),
    and the mov-to-CR0 (0f 22 c0) events in the guest's own code (CS base 0, not SeaBIOS's)."""
    assert_nothing_lost(text)
    insns: Counter = Counter()
    own_cr0 = 0
    for line in text.splitlines():
        m = _EMULATE_RE.search(line)
        if not m:
            assert "kvm_emulate_insn" not in line, line
            continue
        data = m.group(2).split()
        shown = " ".join(data[:4]) + (" .." if len(data) > 4 else "")
        insns[(shown, m.group(3), bool(m.group(4)))] += 1
        own_cr0 += m.group(1) == "0" and shown == "0f 22 c0"
    return insns, own_cr0


def test_emulated_instructions_match_workload_and_tracefs(lab, no_leaked_probes):
    """Round 2 of CR0_COUNT real -> protected -> real round trips: 2 x CR0_COUNT `mov cr0, eax`
    (0f 22 c0), half in real mode, half in 16-bit protected mode; every other event in the
    window (the loop, serial output, SeaBIOS's delay) must match tracefs key for key."""
    with frozen_after_round1(lab, CR0_PARAMS) as (vm, tid):
        with TracefsTruth(tid, ("kvm_emulate_insn",), buffer_kb=16384) as truth:
            lines = trace_round2(vm, "--top", "100000")       # every instruction row
            insns, own_cr0 = emulated_truth(truth.stop())
    missed = sum(line["missed"] for line in lines)
    assert own_cr0 == 2 * CR0_COUNT
    per_vcpu = [r for line in lines for r in line["emulated"]]
    assert per_vcpu and all((r["vm"], r["vcpu"], r["tid"]) == (vm.name, 0, tid) for r in per_vcpu)
    for line in lines:            # one row per instruction: bytes past its length are not in the key
        keys = [(r["insn"], r["length"], r["mode"]) for r in line["emulated_insns"]]
        assert len(keys) == len(set(keys))
    counted: Counter = Counter()
    for r in (r for line in lines for r in line["emulated_insns"]):
        counted[(r["insn"], r["mode"], False)] += r["count"]
        counted[(r["insn"], r["mode"], True)] += r["failed"]
    counted = +counted                                  # drop zero failure counts
    cr0 = {mode: n for (insn, mode, _), n in counted.items() if insn == "0f 22 c0"}
    assert_count(sum(cr0.values()), sum(n for (insn, _, _), n in insns.items() if insn == "0f 22 c0"),
                 missed)
    assert_count(sum(r["count"] + r["failed"] for r in per_vcpu), sum(insns.values()), missed)
    assert sum(counted.values()) == sum(r["count"] + r["failed"] for r in per_vcpu)
    if missed == 0:
        assert counted == insns
        assert cr0 == {"real": CR0_COUNT, "prot16": CR0_COUNT}
    hint = {r["insn"]: r["hint"] for line in lines for r in line["emulated_insns"]}
    assert hint["0f 22 c0"] == "mov to cr0" and hint["0f 20 c0"] == "mov from cr0"


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


def test_colliding_slots_fall_back_exactly(lab, no_leaked_probes):
    """Every direct-mapped array of exits.bpf.c shrunk to one slot, two VMs at once: the VM
    filter slot is shared (the traced_tgids hash decides), the two vCPU threads' exit starts
    collide (one goes to the uexit_start hash) and so do the PIO counters (all but one port
    spill to the pio_counts hash).  Each VM's counts are still its workload's, exactly."""
    with frozen_after_round1(lab, PARAMS) as (a, _ta), frozen_after_round1(lab, PARAMS) as (b, _tb):
        collector = ExitsCollector(Scope((a.name, b.name)), emulated=False, slots=Slots(1, 1, 1))
        try:
            collector.snapshot()
            for vm in (a, b):
                os.kill(vm.pid, signal.SIGCONT)
            for vm in (a, b):
                vm.wait_for("done", timeout=60)
            time.sleep(0.3)
            snap = collector.snapshot()
            spilled = {name: len(collector.program.read_raw(name)) for name in ("uexit_start", "pio_counts")}
        finally:
            collector.close()
    assert spilled["uexit_start"] >= 1 and spilled["pio_counts"] >= 2, spilled   # the fallbacks ran
    missed = snap.missed
    for vm in (a, b):
        def count(rows, **match):
            return sum(r.count for r in rows if r.vm == vm.name
                       and all(getattr(r, k) == v for k, v in match.items()))
        assert_count(count(snap.pio, port=0x700, direction="out"), PIO_COUNT, missed)
        assert_count(count(snap.pio, port=0x21, direction="out"), PIC_COUNT, missed)
        assert_count(count(snap.mmio, gpa=0x80000000, access="write"), MMIO_COUNT, missed)
        assert_count(count(snap.userspace_exits, reason="KVM_EXIT_MMIO"), MMIO_COUNT, missed)
