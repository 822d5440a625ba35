"""The troubleshooting examples (examples/*.py) as tests: each run() must reach the diagnosis
it claims, with numbers that agree with a ground truth read around its kvmbpf command (guest
serial output, /proc schedstat, disk statistics and cgroup counters, interface counters and
UDP statistics in the lab's namespace), and leave nothing behind."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, process_gone
from kvmbpf.lab.lab import STATE_ROOT

sys.path.insert(0, str(ROOT / "examples"))

import grub_spin  # noqa: E402
import no_dhcp  # noqa: E402
import noisy_neighbour  # noqa: E402
import slow_disk  # noqa: E402

PVM = os.path.isdir("/sys/module/kvm_pvm")


class Recorder:
    """An `around` hook: calls `read(scenario)` before and after the example's kvmbpf command."""

    def __init__(self, read):
        self.read = read
        self.scenario = None
        self.before = self.after = None
        self.seconds = 0.0

    @contextlib.contextmanager
    def __call__(self, scenario):
        self.scenario = scenario
        self.before = self.read(scenario)
        start = time.monotonic()
        yield
        self.seconds = time.monotonic() - start
        self.after = self.read(scenario)

    def delta(self, key):
        return self.after[key] - self.before[key]


def children() -> list[int]:
    """Our live child processes (a CLI, QEMU or hog an example failed to end)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.append(int(stat.parent.name))
    return out


def assert_nothing_left(vm, *, netns: str | None = None, cgroup: Path | None = None,
                        pids: tuple[int, ...] = ()) -> None:
    """The example's guest, loop device, namespace, cgroup and helpers are gone; so is its
    kvmbpf process (a BPF program lives only as long as the process holding it)."""
    for pid in (vm.pid, *pids):
        assert process_gone(pid), f"process {pid} is still running"
    assert children() == []
    assert not Path(vm.serial).parent.exists(), "the lab's work directory is left"
    if vm.disk:
        backing = Path(f"/sys/block/{os.path.basename(vm.disk)}/loop/backing_file")
        assert not backing.exists() or str(Path(vm.serial).parent) not in backing.read_text()
    if netns:
        assert not Path("/run/netns", netns).exists()
    if cgroup:
        assert not cgroup.exists()


def test_grub_spin_flags_the_exit_storm():
    """Ground truth: every byte on the guest's serial port is one write to port 0x3f8, and each
    round writes 24 of them ("KVMBPF:begin\\n", "KVMBPF:end\\n") around 2 x CR0_COUNT CR0 writes."""
    rec = Recorder(lambda s: {"serial": Path(s.vm.serial).stat().st_size})
    diag = grub_spin.run(rec)
    ev = diag.evidence
    assert diag.found, diag.summary
    flagged = ev["flagged"]
    assert flagged["rate"] > ev["alert_rate"] == grub_spin.ALERT_RATE
    serial = rec.delta("serial")
    assert 0 < ev["serial_bytes"] <= serial          # the trace saw part of what the guest wrote
    if not PVM:
        assert ev["kvm_exit"] == "seen" and ev["cr0_exits"] > 0
        return assert_nothing_left(rec.scenario.vm)
    assert ev["kvm_exit"] == "not-emitted" and ev["cr0_exits"] == 0
    assert (flagged["view"], flagged["what"]) == ("emulated", "0f 22 c0 mov to cr0")
    per_round = len("KVMBPF:begin\n") + len("KVMBPF:end\n")
    writes = ev["cr0_writes_emulated"]
    # whole rounds seen while traced <= rounds the guest ran meanwhile (+2: one cut at each end)
    assert writes <= (serial // per_round + 2) * 2 * grub_spin.CR0_COUNT
    assert writes >= (ev["serial_bytes"] // per_round - 1) * 2 * grub_spin.CR0_COUNT
    assert writes / ev["interval_s"] > grub_spin.ALERT_RATE
    assert ev["emulated"] >= writes * 3              # a round trip is 7 instructions, 2 of them CR0 writes
    assert_nothing_left(rec.scenario.vm)


def schedstat(pid: int, tid: int) -> dict[str, int]:
    cpu, delay, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return {"cpu": int(cpu), "delay": int(delay), "t": time.monotonic_ns()}


def test_noisy_neighbour_names_the_hog():
    """Ground truth: the vCPU thread's run delay (schedstat) over a span holding the trace; the
    trace's interval is that span minus the rest, which can hold at most its own length of delay."""
    vcpu = Recorder(lambda s: schedstat(s.vm.pid, s.vcpu_tid))
    hog = {}

    @contextlib.contextmanager
    def around(s):
        hog["before"] = schedstat(s.hog_pid, s.hog_pid)
        with vcpu(s):
            yield
        hog["after"] = schedstat(s.hog_pid, s.hog_pid)
    diag = noisy_neighbour.run(around)
    ev, s = diag.evidence, vcpu.scenario
    assert diag.found, diag.summary
    assert ev["vcpu_tid"] == s.vcpu_tid and ev["hog_pid"] == s.hog_pid
    hog_label = f"yes[{s.hog_pid}]"
    assert hog_label in ev["top_culprits_pct"]
    assert ev["top_culprits_pct"][hog_label] == ev["hog_share_pct"] >= noisy_neighbour.HOG_SHARE
    slice_ns = 20e6                                 # a wait in flight at either end
    outside = vcpu.delta("t") - ev["interval_s"] * 1e9
    assert vcpu.delta("delay") - outside - slice_ns <= ev["wait_ns"] <= vcpu.delta("delay") + slice_ns
    assert ev["steal_pct"] == pytest.approx(100 * ev["wait_ns"] / (ev["interval_s"] * 1e9), abs=0.1)
    assert ev["steal_pct"] >= noisy_neighbour.STEAL_FLAG
    assert 0 < ev["hog_wait_ns"] <= (hog["after"]["cpu"] - hog["before"]["cpu"]) * 1.05
    assert_nothing_left(s.vm, pids=(s.hog_pid,))


def disk_counters(s) -> dict[str, int]:
    """Reads and read time (ms) of the loop device; reads of this VM's cgroup on the throttled disk."""
    stat = Path(f"/sys/block/{s.loop}/stat").read_text().split()
    served = 0
    for name in ("blkio.throttle.io_serviced", "io.stat"):
        for line in (s.cgroup / name).read_text().splitlines() if (s.cgroup / name).exists() else []:
            parts = line.split()
            if parts[:1] == [s.backing_dev] and parts[1:2] == ["Read"]:
                served += int(parts[2])
            elif parts[:1] == [s.backing_dev]:
                served += sum(int(p.split("=")[1]) for p in parts[1:] if p.startswith("rios="))
    return {"reads": int(stat[0]), "read_ms": int(stat[3]), "throttled_reads": served}


def test_slow_disk_shows_the_time_in_the_device():
    """Ground truth: /sys/block/<loop>/stat (reads, ms spent reading) and the VM cgroup's count
    of reads on the throttled disk, over a span holding the trace; the throttle's rate."""
    rec = Recorder(disk_counters)
    diag = slow_disk.run(rec)
    ev, s = diag.evidence, rec.scenario
    assert diag.found, diag.summary
    assert ev["device"] == s.loop
    reads = rec.delta("reads")
    assert 0 < ev["reads"] <= reads
    # every loop read went to the disk under it, through this VM's throttle
    assert ev["reads"] <= rec.delta("throttled_reads")
    assert ev["reads_per_s"] <= slow_disk.IOPS * 1.25
    disk_mean_ms = rec.delta("read_ms") / reads
    assert ev["queue_mean_ms"] == pytest.approx(disk_mean_ms, rel=0.35, abs=2)
    assert ev["queue_p90_ms"] >= slow_disk.SLOW_MS and ev["device_share_p90"] >= slow_disk.DEVICE_SHARE
    assert ev["issue_mean_ms"] <= ev["queue_mean_ms"] * 1.001
    assert_nothing_left(s.vm, cgroup=s.cgroup)


def udp_ignored_multi(net) -> int:
    """Udp IgnoredMulti in the lab namespace: broadcasts UDP had no socket for."""
    lines = [line.split() for line in net._ns("cat", "/proc/net/snmp").splitlines() if line.startswith("Udp:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("IgnoredMulti")])


def test_no_dhcp_discovers_without_offers():
    """Ground truth: the guest's own markers (one per DISCOVER), the tap's interface counters,
    UDP's IgnoredMulti in the lab namespace, and dnsmasq's log (it logged nothing)."""
    def read(s):
        log = s.net.dnsmasq_log.read_text() if s.net.dnsmasq_log.exists() else ""
        return {**s.net.counters(s.vm.tap), "ignored": udp_ignored_multi(s.net),
                "dnsmasq_running": s.net.dnsmasq_pid is not None,
                "logged_discovers": log.count("DHCPDISCOVER"), "markers": s.vm.markers()}
    rec = Recorder(read)
    diag = no_dhcp.run(rec)
    ev, s = diag.evidence, rec.scenario
    assert diag.found, diag.summary
    markers = rec.after["markers"]
    discovers = markers.count("dhcp-discover")
    assert discovers == 3 and "dhcp-failed" in markers and "go" in markers
    assert ev["from_guest_frames"] == discovers == rec.delta("rx_packets")
    assert ev["from_guest_bytes"] == rec.delta("rx_bytes") == 342 * discovers
    assert ev["to_guest_frames"] == rec.delta("tx_packets") == 1          # only the "go" frame
    assert ev["to_guest_bytes"] == rec.delta("tx_bytes")
    assert sum(ev["drops"].values()) == rec.delta("ignored") == discovers
    assert not rec.before["dnsmasq_running"] and rec.delta("logged_discovers") == 0
    assert_nothing_left(s.vm, netns=s.net.netns)


def lab_of(vm: str) -> list[tuple[Path, int]]:
    """(lab directory, QEMU pid) of the labs running a VM of that name."""
    out = []
    for state in Path(STATE_ROOT).glob("*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            out += [(state.parent, v["pid"]) for v in json.loads(state.read_text())["vms"]
                    if v["name"] == vm]
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_example_tears_its_lab_down(sig):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM while the kvmbpf command runs:
    the example exits 130 and its guest, lab directory and kvmbpf process are gone."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "grub_spin.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        name = None
        for line in proc.stderr:
            if line.startswith("starting lab guest "):
                name = line.split()[3].rstrip(":")
            if line.startswith("$ kvmbpf"):
                break
        time.sleep(1)
        (lab_dir, qemu_pid), = lab_of(name)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:            # the example's own teardown first, then force
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130
    assert process_gone(qemu_pid)
    assert not lab_dir.exists()
    assert children() == []
