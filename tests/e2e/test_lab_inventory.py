"""The lab boots real guests; `kvmbpf vms` finds them; `lab down` leaves nothing behind."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import process_gone, run_kvmbpf, unique
from kvmbpf.lab.lab import Lab


def test_vms_finds_a_lab_guest_with_name_vcpu_tap_bridge_and_loop(lab):
    name = unique("inv")
    disk = lab.loop_disk(name)
    net = lab.network()
    vm = lab.start_vm(name, "exits", {"ROUNDS": 1}, disk=disk, net=net)
    vm.wait_for("done")
    res = run_kvmbpf("vms", "--json", check=True)
    found = [v for v in json.loads(res.out) if v["name"] == name]
    assert len(found) == 1
    entry = found[0]
    assert entry["pid"] == vm.pid
    # the vCPU thread is the one QEMU names "CPU 0/KVM", as /proc says
    tids = {int(t): Path(f"/proc/{vm.pid}/task/{t}/comm").read_text().strip()
            for t in os.listdir(f"/proc/{vm.pid}/task")}
    assert [(c["index"], tids[c["tid"]]) for c in entry["vcpus"]] == [(0, "CPU 0/KVM")]
    assert entry["taps"] == [{"name": vm.tap, "bridge": net.bridge, "netns": entry["taps"][0]["netns"]}]
    loop = [d for d in entry["disks"] if d["devname"].startswith("loop")]
    assert loop and loop[0]["backing"] == disk.backing
    major, minor = os.major(os.stat(disk.device).st_rdev), os.minor(os.stat(disk.device).st_rdev)
    assert loop[0]["device"] == f"{major}:{minor}"
    table = run_kvmbpf("vms", check=True).out
    assert name in table


def test_lab_up_down_from_the_cli_leaves_nothing():
    ident = "c" + unique("x")[-6:]
    before_ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    res = run_kvmbpf("lab", "up", "--id", ident, "--name", f"up-{ident}")
    try:
        assert res.rc == 0, res.err
        status = json.loads(run_kvmbpf("lab", "status", "--json", check=True).out)
        mine = [s for s in status if s["lab"] == ident][0]
        assert mine["vms"][0]["running"]
        pid = mine["vms"][0]["pid"]
        loop = mine["loops"][0]["device"]
        netns = mine["networks"][0]
    finally:
        down = run_kvmbpf("lab", "down", "--id", ident)
    assert down.rc == 0, down.err
    assert process_gone(pid)
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert loop not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not Path(f"/run/kvmbpf-lab/{ident}").exists()
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before_ns


def test_lab_refuses_a_second_vm_with_the_same_name(lab):
    name = unique("dup")
    lab.up("spin", name=name, disk=False, net=False)
    again = Lab(lab.lab_id)
    try:
        again.up("spin", name=name, disk=False, net=False)
    except Exception as exc:  # noqa: BLE001
        assert "already runs" in str(exc)
    else:
        raise AssertionError("second up with the same name succeeded")


def test_bad_input_is_one_line_and_exit_2():
    for args in (["vms", "--bogus"], ["lab", "up", "--workload", "nope"], ["lab", "up", "--id", "bad id!"],
                 ["nosuchcommand"]):
        res = run_kvmbpf(*args)
        assert res.rc == 2, (args, res.rc, res.err)
        assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err, res.err


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    """The real CLI without privileges (uid/gid 65534, no capabilities)."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "kvmbpf", *args], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])


def test_without_root_tracing_is_one_line_and_exit_2():
    for args in (["exits", "-d", "1"], ["steal", "-d", "1"], ["blk", "-d", "1"], ["net", "-d", "1"],
                 ["lab", "up", "--id", "nobody"]):
        res = as_nobody(*args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert "root" in res.stderr


def test_without_root_doctor_says_why_nothing_can_trace():
    res = as_nobody("doctor", "--json")
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["privileges"]["ok"] and "root" in checks["privileges"]["fix"]
    assert report["collectors"]["exits"] and "privileges" in report["collectors"]["exits"]
