"""kvmbpf net's kprobe plan on a kernel with kprobes: the nested lab (Debian 6.1; tun and the
bridge are modules there, so fentry is out for bcc 0.26 and kprobes are the plan).

One boot runs GUEST_SCRIPT: a bridge with a tap (the test holds it open, as a VMM would) and a
veth pair (va on the bridge, vb outside it, its MAC a static FDB entry on va), then
`kvmbpf net` (attach plan: auto) while
  * N frames are written into the tap to vb's MAC: tun_get_user, br_handle_frame and
    br_forward on the tap, __dev_queue_xmit on va, a forward latency tap -> va each;
  * M frames are sent out of the bridge to the tap's MAC (learned from the writes): on the
    bridge __dev_queue_xmit, br_dev_xmit, br_forward; on the tap __dev_queue_xmit and
    tun_net_xmit (queued towards the reader, which never reads).
Ground truth: the known N and M, and the devices' interface counters.
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nestedlab import run_nested, skip_module_unless_available  # noqa: E402

pytestmark = pytest.mark.nested

skip_module_unless_available()

N_IN, M_OUT = 300, 50

GUEST_SCRIPT = r'''
import fcntl, json, os, socket, struct, subprocess, sys, time
sys.path.insert(0, "/project")
from kvmbpf.lab.network import IFF_NO_PI, IFF_TAP, TUNSETIFF, ether_frame

N, M = @N@, @M@
TAP_MAC, VB_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"

def sh(*cmd):
    subprocess.run(cmd, check=True)

def counters(dev):
    return {s: int(open(f"/sys/class/net/{dev}/statistics/{s}").read())
            for s in ("rx_packets", "tx_packets")}

for scope in ("all", "default"):      # no IPv6: no router solicitations or MLD on the ports
    sh("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
sh("sysctl", "-qw", "net.ipv4.igmp_link_local_mcast_reports=0")   # nor IGMP reports from br0
sh("ip", "link", "add", "br0", "type", "bridge")
sh("ip", "tuntap", "add", "dev", "tapw", "mode", "tap")
sh("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
sh("ip", "link", "set", "vb", "address", VB_MAC)
for dev in ("tapw", "va"):
    sh("ip", "link", "set", dev, "master", "br0")
for dev in ("br0", "tapw", "va", "vb"):   # no IGMP reports either (seen flooded to the tap)
    sh("ip", "link", "set", dev, "multicast", "off")
    sh("ip", "link", "set", dev, "up")
sh("bridge", "fdb", "add", VB_MAC, "dev", "va", "master", "static")

fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tapw", IFF_TAP | IFF_NO_PI).ljust(40, b"\0"))
time.sleep(1.0)                        # carrier up -> the port forwards
before = {dev: counters(dev) for dev in ("tapw", "va", "br0")}
start = time.monotonic()
tool = subprocess.Popen([sys.executable, "-m", "kvmbpf", "net", "1", "--json", "-d", "@D@",
                         "--dev", "tapw", "--dev", "va", "--dev", "vb",
                         "--dev", "br0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, cwd="/project")
first = tool.stdout.readline()         # the first interval: everything is attached
attach_s = time.monotonic() - start
for _ in range(N):
    os.write(fd, ether_frame(VB_MAC, TAP_MAC, 0x88B5, 60))
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
    sock.bind(("br0", 0))
    for _ in range(M):
        sock.send(ether_frame(TAP_MAC, "02:00:00:00:00:0c", 0x88B5, 60))
time.sleep(1.0)
os.set_blocking(fd, False)
read = []                              # what the VMM side of the tap receives
while True:
    try:
        read.append(os.read(fd, 2048))
    except BlockingIOError:
        break
after = {dev: counters(dev) for dev in ("tapw", "va", "br0")}
out, err = tool.communicate(timeout=600)
os.close(fd)
lines = [json.loads(l) for l in (first + out).splitlines() if l.startswith("{")]
print(json.dumps({"read": [f[:6].hex() for f in read], "rc": tool.returncode, "err": err[-3000:], "attach_s": attach_s, "lines": lines,
                  "counters": {d: {k: after[d][k] - before[d][k] for k in after[d]} for d in after}}))
'''


@pytest.fixture(scope="module")
def nested():
    script = GUEST_SCRIPT.replace("@N@", str(N_IN)).replace("@M@", str(M_OUT)).replace("@D@", "8")
    res = run_nested(f"python3 - <<'EOF'\n{script}\nEOF\n", timeout=900)
    assert res.rc == 0, f"guest script failed rc={res.rc}\n{res.stderr}\n{res.console[-3000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0, out["err"]
    return out


def calls(nested) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for line in nested["lines"]:
        for c in line["calls"]:
            out[(c["dev"], c["function"])] = out.get((c["dev"], c["function"]), 0) + c["calls"]
    return out


def test_kprobe_plan_is_used_and_said(nested):
    assert all(line["plan"] == "kprobe" for line in nested["lines"])
    attach = nested["lines"][0]["attach"]
    assert attach.startswith("kprobe on tun_get_user, br_handle_frame, br_forward, __dev_queue_xmit")
    assert "vmlinux functions only" in attach          # why not fentry: tun/bridge are modules


def test_function_calls_equal_the_known_traffic(nested):
    counters = nested["counters"]
    assert counters["tapw"]["rx_packets"] == N_IN and counters["va"]["tx_packets"] == N_IN
    assert nested["read"] == ["02000000000a"] * M_OUT        # the tap's reader got exactly the M frames
    assert counters["tapw"]["tx_packets"] == M_OUT == counters["br0"]["tx_packets"]
    assert calls(nested) == {
        ("tapw", "tun_get_user"): N_IN, ("tapw", "br_handle_frame"): N_IN, ("tapw", "br_forward"): N_IN,
        ("va", "dev_queue_xmit"): N_IN,
        ("br0", "dev_queue_xmit"): M_OUT, ("br0", "br_dev_xmit"): M_OUT, ("br0", "br_forward"): M_OUT,
        ("tapw", "dev_queue_xmit"): M_OUT, ("tapw", "tun_net_xmit"): M_OUT}


def test_forward_latency_from_tun_get_user(nested):
    rows = [f for line in nested["lines"] for f in line["forward_latency"]]
    assert rows and all((f["ingress"], f["egress"], f["start"]) == ("tapw", "va", "tun_get_user") for f in rows)
    assert sum(f["latency"]["count"] for f in rows) == N_IN
    for f in rows:
        assert 0 < f["latency"]["p50"] <= f["latency"]["p99"] <= f["latency"]["max"]
