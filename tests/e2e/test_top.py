"""`kvmbpf top` in a real 80x24 terminal (tmux): rows, rates against the guest's own round count,
alert flags, collectors that are off, drill-down, and a clean exit on q and Ctrl-C."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT, process_gone, prog_ids_of, tracing_prog_ids, unique

HOT, COLD = 2000, 10


class TopInTmux:
    """kvmbpf top running in a detached 80x24 tmux session."""

    def __init__(self, tmp_path, *args: str):
        self.session = "kvmbpf-top-" + uuid.uuid4().hex[:6]
        self.rc_file = tmp_path / "rc"
        # the shell traps SIGINT (Ctrl-C reaches the whole foreground group) to record the status
        cmd = (f"trap true INT; cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} -m kvmbpf top "
               + " ".join(shlex.quote(a) for a in args)
               + f" 2>{tmp_path / 'err'}; echo $? > {self.rc_file}; sleep 120")
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "80", "-y", "24",
                        "sh", "-c", cmd], check=True)
        shell = int(self._tmux("display", "-p", "-t", self.session, "#{pane_pid}").strip())
        self.pid = self._child_of(shell)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout

    @staticmethod
    def _child_of(ppid: int, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["pgrep", "-P", str(ppid)], capture_output=True, text=True).stdout
            kids = [int(p) for p in out.split()]
            if kids:
                return kids[0]
            time.sleep(0.05)
        raise AssertionError("kvmbpf top did not start")

    def screen(self) -> list[str]:
        return self._tmux("capture-pane", "-p", "-t", self.session).splitlines()

    def wait_for(self, pattern: str, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.screen()
            if re.search(pattern, "\n".join(lines), re.M):
                return lines
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} on screen:\n" + "\n".join(self.screen()))

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def exit_status(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rc_file.exists() and self.rc_file.read_text().strip():
                return int(self.rc_file.read_text())
            time.sleep(0.1)
        raise AssertionError("kvmbpf top did not exit:\n" + "\n".join(self.screen()))

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)


def rate(cell: str) -> float:
    """'15.7k' -> 15700."""
    m = re.fullmatch(r"([\d.]+)([kMG]?)", cell)
    assert m, cell
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def row_of(lines: list[str], name: str) -> list[str]:
    return next(line.split() for line in lines if line[1:].startswith(name))


@pytest.fixture
def guests(lab):
    hot, cold = unique("h"), unique("c")
    vms = {name: lab.start_vm(name, "exits", {"PIO_COUNT": n, "DELAY_MS": 100, "ROUNDS": 0})
           for name, n in ((hot, HOT), (cold, COLD))}
    return hot, cold, vms


def test_top_rows_rates_flags_drill_and_q(guests, tmp_path):
    hot, cold, vms = guests
    # the steal alert is set out of reach: this shared host's steal must not flag `cold`
    top = TopInTmux(tmp_path, "2", "--vm", hot, "--vm", cold, "--exit-alert", "5000",
                    "--steal-alert", "100", "--collector", "exits", "--collector", "steal")
    try:
        top.wait_for(rf"^.{re.escape(hot)} ")
        ours = prog_ids_of(top.pid)
        assert ours, "top attached no BPF program"
        # ground truth: the guest's rounds (HOT writes to port 0x700 each) over a few refreshes;
        # exits/s also counts the guest's delay loop (timer port reads), hence the tolerance
        begin0, t0 = vms[hot].markers().count("begin"), time.monotonic()
        readings = []
        for _ in range(3):
            stamp = top.screen()[0].split()[2]
            lines = top.wait_for(r"^kvmbpf top (?!" + re.escape(stamp) + ")")
            readings.append(rate(row_of(lines, hot)[1]))
        truth = HOT * (vms[hot].markers().count("begin") - begin0) / (time.monotonic() - t0)
        mean = sum(readings) / len(readings)
        assert mean == pytest.approx(truth, rel=0.3), (readings, truth)
        assert all(len(line) <= 80 for line in lines) and len(lines) <= 24
        assert lines[0].startswith("kvmbpf top") and "2 VM(s)" in lines[0]
        assert any(line.startswith("!" + hot) for line in lines)          # > 5000 IO exits/s
        assert any(line.startswith(" " + cold) for line in lines)         # ~100/s: not flagged
        assert "KVM_EXIT_IO" in " ".join(row_of(lines, hot))
        # drill into the selected (busiest) VM: its per-port series
        top.keys("Enter")
        drill = top.wait_for(r"port=0x700")
        assert any(line.startswith(hot + ": every series") for line in drill)
        port_rate = rate(next(line.split()[-1] for line in drill if "port=0x700" in line)[:-2])
        assert port_rate == pytest.approx(truth, rel=0.3), (port_rate, truth)
        top.keys("Escape")
        top.wait_for(rf"^.{re.escape(cold)} ")
        top.keys("q")
        assert top.exit_status() == 0
        assert process_gone(top.pid)
        assert not (ours & tracing_prog_ids()), "top left its BPF programs loaded"
    finally:
        top.close()


def test_top_says_what_is_off_and_exits_on_ctrl_c(guests, tmp_path):
    hot, cold, _ = guests
    # --vcpu does not apply to block I/O: blk is off, and the screen must say why;
    # one --vm opens its drill-down directly
    top = TopInTmux(tmp_path, "1", "--vm", hot, "--vcpu", "0", "--collector", "exits",
                    "--collector", "blk", "--filter", hot[:3])
    try:
        lines = top.wait_for(rf"^{re.escape(hot)}: every series(.|\n)*port=0x700")
        ours = prog_ids_of(top.pid)
        off = [line for line in lines if line.startswith("off: blk:")]
        assert off and "--vcpu does not apply" in off[0]
        assert f"filter:{hot[:3]}" in lines[0]
        top.keys("C-c")
        assert top.exit_status() == 0
        assert process_gone(top.pid)
        assert ours and not (ours & tracing_prog_ids()), "top left its BPF programs loaded"
    finally:
        top.close()


def test_top_bad_input_exit_2(tmp_path):
    from conftest import run_kvmbpf
    res = run_kvmbpf("top", "--vm", "no-such-vm-" + uuid.uuid4().hex[:4], "1", "1")
    assert res.rc == 2 and res.err.startswith("kvmbpf: error: no VM named")
    res = run_kvmbpf("top", "--sort", "bogus")
    assert res.rc == 2 and res.err.count("\n") == 1
