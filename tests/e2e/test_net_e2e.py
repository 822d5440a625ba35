"""kvmbpf net against real traffic: the net lab guest (virtio-net, DHCP with the lab's dnsmasq,
UDP to a closed port) and frames written into taps by the test.  Ground truths: the guest's
known workload, dnsmasq's log, interface counters, nstat, nftables rule counters."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from kvmbpf import kernel
from kvmbpf.lab.network import ether_frame
from tests.conftest import ROOT, run_kvmbpf, unique

GUEST_MAC = "52:54:00:12:34:56"
UDP_LEN = 64
UDP_FRAME = 14 + 20 + 8 + UDP_LEN
DHCP_FRAME = 342
GO_ETHERTYPE = 0x88B5


class NetTrace:
    """`kvmbpf net 0.5 --json -d SECONDS ...` in the background, ending on its own (a SIGINT could
    land while it is busy reading, see test_sigint_*); `stop()` waits and keeps every interval."""

    def __init__(self, *args: str, duration: float = 10.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmbpf", "net", "0.5", "--json",
                                      "-d", str(duration), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        first = self.proc.stdout.readline()          # the first interval: the probes are attached
        if not first:
            raise AssertionError(f"kvmbpf net failed: {self.proc.stderr.read()}")
        self.lines: list[dict] = [json.loads(first)]

    def stop(self) -> "NetTrace":
        assert self.proc.poll() is None, "the workload outlasted the trace: raise its duration"
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        self.lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return self

    def dev(self, name: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for line in self.lines:
            for d in line["devices"]:
                if d["dev"] == name:
                    for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "tx_failed"):
                        total[key] = total.get(key, 0) + d[key]
        return total

    def drops(self, reason: str) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for line in self.lines:
            for d in line["drops"]:
                if d["reason"] == reason:
                    out[(d["dev"], d["location"])] = out.get((d["dev"], d["location"]), 0) + d["count"]
        return out

    def protos(self, dev: str) -> dict[tuple[str, str], int]:
        """(direction, protocol label) -> frames on dev, over every interval."""
        out: dict[tuple[str, str], int] = {}
        for line in self.lines:
            for p in line["protocols"]:
                if p["dev"] == dev:
                    label = f"{p['protocol']} {p['dhcp']}" if p["dhcp"] else p["protocol"]
                    out[(p["direction"], label)] = out.get((p["direction"], label), 0) + p["packets"]
        return out

    def latency_count(self, ingress: str, egress: str) -> int:
        return sum(f["latency"]["count"] for line in self.lines for f in line["forward_latency"]
                   if (f["ingress"], f["egress"]) == (ingress, egress))

    def forwards(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for line in self.lines:
            for f in line["forwards"]:
                out[(f["ingress"], f["egress"])] = out.get((f["ingress"], f["egress"]), 0) + f["packets"]
        return out


def net_prog_ids() -> set[int]:
    """Loaded programs on net:/skb: tracepoints (bcc names them tracepoint__<group>__<event>)."""
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True).stdout
    return {p["id"] for p in json.loads(out or "[]")
            if p.get("name", "").startswith(("tracepoint__net", "tracepoint__skb"))}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def nstat(net, *names: str) -> dict[str, int]:
    out = net._ns("nstat", "-az", "--json", *names)
    return {k: int(v) for k, v in json.loads(out)["kernel"].items()}


def dnsmasq_count(net, message: str) -> int:
    return len(re.findall(rf"\b{message}\(", net.dnsmasq_log.read_text()))


def nft(net, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", net.netns, "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True)


def no_icmp_errors(net) -> None:
    """Drop the host's ICMP port unreachables: sending them makes it ARP for the guest, frames
    to the guest that no ground truth predicts."""
    nft(net, "table inet kvt {\n chain out {\n type filter hook output priority 0;\n"
             " icmp type destination-unreachable drop\n }\n}\n")


def start_guest(lab, udp_count: int):
    net = lab.network()
    name = unique("n")
    vm = lab.start_vm(name, "net", {"GO_WAIT": 1, "UDP_COUNT": udp_count, "UDP_LEN": UDP_LEN},
                      net=net, mac=GUEST_MAC)
    return net, vm, vm.tap


def go(net) -> None:
    """The frame the guest waits for, sent out of the bridge (host -> guest: one frame)."""
    net.send_frames(net.bridge, ether_frame(GUEST_MAC, net.mac(net.bridge), GO_ETHERTYPE, 60))


def test_guest_dhcp_and_udp_exact(lab, no_leaked_probes):
    udp = 400
    net, vm, tap = start_guest(lab, udp)
    no_icmp_errors(net)
    trace = NetTrace("--vm", vm.name)
    before, ns_before = net.counters(tap), nstat(net, "UdpNoPorts", "IcmpOutDestUnreachs")
    go(net)
    vm.wait_for("done", timeout=60)
    after, ns_after = net.counters(tap), nstat(net, "UdpNoPorts", "IcmpOutDestUnreachs")
    trace.stop()
    counters, ns = delta(before, after), delta(ns_before, ns_after)
    got, bridge = trace.dev(tap), trace.dev(net.bridge)

    discovers, requests = dnsmasq_count(net, "DHCPDISCOVER"), dnsmasq_count(net, "DHCPREQUEST")
    offers, acks = dnsmasq_count(net, "DHCPOFFER"), dnsmasq_count(net, "DHCPACK")
    assert discovers == vm.markers().count("dhcp-discover") >= 1 and requests == 1
    assert offers >= 1 and acks == 1
    # guest -> host: the DHCP messages and every UDP datagram, exactly, with their sizes
    assert got["rx_packets"] == discovers + requests + udp == counters["rx_packets"]
    assert got["rx_bytes"] == (discovers + requests) * DHCP_FRAME + udp * UDP_FRAME == counters["rx_bytes"]
    # host -> guest: the go frame and dnsmasq's replies (IPv6 is off in the lab namespace)
    assert got["tx_packets"] == 1 + offers + acks == counters["tx_packets"]
    assert got["tx_bytes"] == counters["tx_bytes"] and got["tx_failed"] == 0
    # the bridge passed everything up to the host and sent the host's frames; nothing forwarded.
    # Its rx also has the loopback copies of dnsmasq's broadcast replies (IP broadcast loopback).
    assert bridge["rx_packets"] == got["rx_packets"] + offers + acks
    assert bridge["tx_packets"] == got["tx_packets"]
    assert trace.forwards() == {}
    # every datagram to the closed port was dropped as NO_SOCKET in UDP's receive path
    no_socket = trace.drops("NO_SOCKET")
    assert sum(no_socket.values()) == udp == ns["UdpNoPorts"]
    assert set(no_socket) and all(dev == tap and "udp" in loc for dev, loc in no_socket)
    # ICMP port unreachables are rate limited: fewer than datagrams, so drops are not inferred from them
    assert 0 < ns["IcmpOutDestUnreachs"] < udp
    vms = {v["vm"]: v for line in trace.lines for v in line["vms"]}
    assert vms[vm.name]["taps"] == [tap]
    assert all("tracepoints" in line["attach"] and "kprobe" in line["attach"] for line in trace.lines)
    # protocols, read from the frames: DHCP by message type as in dnsmasq's log, the datagrams
    # as other UDP, the go frame (EtherType 0x88b5) as other; nothing else on the tap
    assert trace.protos(tap) == {("rx", "DHCP DISCOVER"): discovers, ("rx", "DHCP REQUEST"): requests,
                                 ("rx", "other UDP"): udp, ("tx", "other"): 1,
                                 ("tx", "DHCP OFFER"): offers, ("tx", "DHCP ACK"): acks}
    assert not any("DHCPDISCOVER" in note for line in trace.lines for note in line["notes"])


def test_dhcp_discover_without_offer_when_dnsmasq_is_down(lab, no_leaked_probes):
    net, vm, tap = start_guest(lab, 1)
    net.stop_dnsmasq()
    trace = NetTrace("--vm", vm.name, duration=30)
    go(net)
    vm.wait_for("dhcp-failed", timeout=60)
    trace.stop()
    discovers = vm.markers().count("dhcp-discover")
    assert discovers == 3
    assert trace.protos(tap) == {("rx", "DHCP DISCOVER"): discovers, ("tx", "other"): 1}
    notes = [n for line in trace.lines for n in line["notes"] if "DHCPDISCOVER" in n]
    assert notes and all(n.startswith(f"{tap}: ") and "no DHCPOFFER" in n for n in notes)


def ipv4_frame(dst: str, src: str, proto: int, sport: int, dport: int, size: int) -> bytes:
    """Ethernet + IPv4 header (protocol `proto`) + source/destination ports, zero padded."""
    ip = bytes([0x45, 0, 0, size - 14, 0, 0, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return (ether_frame(dst, src, 0x0800, 14) + ip + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")).ljust(size, b"\0")


def test_protocols_of_frames_written_into_a_tap(lab, no_leaked_probes):
    """Frames of known protocols to an unknown unicast address: received by the tap, flooded
    to no other port (the tap is the bridge's only one), never passed up to the host."""
    net = lab.network()
    tap = net.add_tap(unique("tw")[:15])
    dst, src = "02:00:00:00:00:09", "02:00:00:00:00:01"
    sent = {"ARP": (ether_frame(dst, src, 0x0806, 60), 311), "IPv6": (ether_frame(dst, src, 0x86DD, 80), 57),
            "other": (ether_frame(dst, src, GO_ETHERTYPE, 60), 23),
            "DNS": (ipv4_frame(dst, src, 17, 40000, 53, 80), 41), "ICMP": (ipv4_frame(dst, src, 1, 0, 0, 60), 19),
            "other TCP": (ipv4_frame(dst, src, 6, 40000, 80, 60), 13),
            "other IPv4": (ipv4_frame(dst, src, 47, 0, 0, 60), 7)}
    trace = NetTrace("--dev", tap)
    before = net.counters(tap)
    for frame, count in sent.values():
        net.send_frames(tap, frame, count, tap=True, settle=0.3)
    counters = delta(before, net.counters(tap))
    trace.stop()
    assert counters["rx_packets"] == sum(n for _, n in sent.values())
    assert trace.protos(tap) == {("rx", name): n for name, (_, n) in sent.items()}


def test_nftables_bridge_drop_counted_with_reason(lab, no_leaked_probes):
    udp = 300
    net, vm, tap = start_guest(lab, udp)
    nft(net, f'table bridge kvt {{\n chain pre {{\n type filter hook prerouting priority 0;\n'
             f' iifname "{tap}" udp dport 9 counter drop\n }}\n}}\n')
    trace = NetTrace("--vm", vm.name)
    go(net)
    vm.wait_for("done", timeout=60)
    trace.stop()
    rules = json.loads(subprocess.run(["ip", "netns", "exec", net.netns, "nft", "-j", "list", "table",
                                       "bridge", "kvt"], capture_output=True, text=True, check=True).stdout)
    counter = next(expr["counter"]["packets"] for item in rules["nftables"] if "rule" in item
                   for expr in item["rule"]["expr"] if "counter" in expr)
    dropped = trace.drops("NETFILTER_DROP")
    assert counter == udp
    assert sum(dropped.values()) == counter
    assert all(dev == tap for dev, _ in dropped) and not trace.drops("NO_SOCKET")


def test_frames_written_into_a_tap_exact(lab, no_leaked_probes):
    net = lab.network()
    tap = net.add_tap(unique("tw")[:15])
    count, size = 700, 142
    trace = NetTrace("--dev", tap, "--dev", net.bridge)
    before = net.counters(tap)
    # to the bridge's own address, an EtherType nobody handles: received, then dropped by the host
    net.send_frames(tap, ether_frame(net.mac(net.bridge), "02:00:00:00:00:01", GO_ETHERTYPE, size),
                    count, tap=True, settle=1.0)
    counters = delta(before, net.counters(tap))
    trace.stop()
    got = trace.dev(tap)
    assert got["rx_packets"] == count == counters["rx_packets"]
    assert got["rx_bytes"] == count * size == counters["rx_bytes"]
    assert trace.dev(net.bridge)["rx_packets"] == count
    unhandled = trace.drops("UNHANDLED_PROTO")
    assert sum(unhandled.values()) == count and all(dev == tap for dev, _ in unhandled)


def test_forward_to_guest_and_tap_queue_overrun(lab, no_leaked_probes):
    """Frames from a second tap to the guest's MAC are bridge forwards; the halted guest stops
    reading, so tun's queue fills and the rest are dropped (tx failed, FULL_RING)."""
    net, vm, guest_tap = start_guest(lab, 1)
    no_icmp_errors(net)
    go(net)
    vm.wait_for("done", timeout=60)       # the guest has transmitted: the bridge knows its MAC
    writer = net.add_tap(unique("tw")[:15])
    count, size = 3000, 90
    trace = NetTrace("--dev", writer, "--dev", guest_tap, "--dev", net.bridge)
    before = net.counters(guest_tap)
    net.send_frames(writer, ether_frame(GUEST_MAC, "02:00:00:00:00:02", GO_ETHERTYPE, size), count,
                    tap=True, settle=1.0)
    counters = delta(before, net.counters(guest_tap))
    trace.stop()
    got = trace.dev(guest_tap)
    assert trace.forwards() == {(writer, guest_tap): count}
    assert got["tx_packets"] + got["tx_failed"] == count
    assert got["tx_failed"] == counters["tx_dropped"] > 0
    assert got["tx_bytes"] == got["tx_packets"] * size
    full = trace.drops("FULL_RING")
    assert sum(full.values()) == got["tx_failed"]
    assert all(dev == writer and loc.startswith("tun_net_xmit") for dev, loc in full)
    # a latency per forward transmitted, but for the few QEMU read (and freed) before
    # net_dev_xmit fired: it stops reading once the guest's 16 buffers are full
    assert got["tx_packets"] - 16 <= trace.latency_count(writer, guest_tap) <= got["tx_packets"]
    assert trace.protos(writer) == {("rx", "other"): count}


def test_sigint_prints_partial_interval_and_detaches(lab, no_leaked_probes):
    net = lab.network()
    tap = net.add_tap(unique("tw")[:15])
    before_ids = net_prog_ids()
    proc = subprocess.Popen([sys.executable, "-m", "kvmbpf", "net", "--json", "--dev", tap],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while len(net_prog_ids() - before_ids) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)                       # our five programs are in; let attaching finish
    net.send_frames(tap, ether_frame("02:00:00:00:00:09", "02:00:00:00:00:01", GO_ETHERTYPE, 64), 250,
                    tap=True, settle=0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 1
    assert [(d["dev"], d["rx_packets"]) for d in lines[0]["devices"]] == [(tap, 250)]


@pytest.mark.parametrize("args, message", [
    (("--tap", "nosuchtap0"), "no network device 'nosuchtap0'"),
    (("--dev", "a/b"), "is not a network device name"),
    (("--dev", "x" * 16), "is not a network device name"),
    (("--vcpu", "0"), "--vcpu does not apply to net"),
    (("--vm", "no-such-vm-kvmbpf"), "no VM named"),
    (("0",), "interval must be > 0"),
])
def test_bad_input_one_line_exit_2(args, message, no_leaked_probes):
    res = run_kvmbpf("net", *args, "-d", "1")
    assert res.rc == 2
    assert res.err.count("\n") == 1 and res.err.startswith("kvmbpf: error:") and message in res.err


@pytest.mark.skipif(kernel.has_kprobes(), reason="this kernel has kprobes: --attach kprobe is valid here")
def test_attach_kprobe_without_kprobes_is_one_line_exit_2(no_leaked_probes):
    res = run_kvmbpf("net", "--attach", "kprobe", "-d", "1")
    assert res.rc == 2 and res.err.count("\n") == 1
    assert res.err.startswith("kvmbpf: error: --attach kprobe: kprobes are not available")
