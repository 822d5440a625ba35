"""kvmbpf net's pure logic: device selection and validation, row building, symbolization."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvmbpf.collectors.net import (DEEP_FUNCTIONS, KINDS, PROTOS, Counts, Device, HostProbes, Kallsyms,
                                   NetSnapshot, Plan, build, build_packets, check_devices, choose_plan,
                                   dhcp_notes, struct_offsets, vm_devices)
from kvmbpf.errors import KvmbpfError
from kvmbpf.inventory import VM, Inventory, Tap
from kvmbpf.lab.network import ether_frame
from kvmbpf.snapshot import plain
from kvmbpf.tracefs import parse_format, symbolic_tables

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def inventory() -> Inventory:
    return Inventory([VM(10, "web", "/usr/bin/qemu", taps=[Tap("tapweb", "br0"), Tap("tapweb2", "br0")]),
                      VM(20, "db", "/usr/bin/qemu", taps=[Tap("tapdb", None)])])


def test_vm_devices_taps_and_their_bridges():
    devs = vm_devices(inventory().vms)
    assert devs["tapweb"] == Device("tapweb", "tap", "web", "br0")
    assert devs["br0"] == Device("br0", "bridge")
    assert devs["tapdb"].vm == "db" and set(devs) == {"tapweb", "tapweb2", "br0", "tapdb"}


def test_check_devices(tmp_path):
    (tmp_path / "class" / "net" / "eth0").mkdir(parents=True)
    got = check_devices(("tapweb", "eth0"), inventory(), str(tmp_path), str(tmp_path / "netns"))
    assert got["tapweb"].vm == "web" and got["eth0"].kind == "device"
    with pytest.raises(KvmbpfError, match="no network device 'tapx'.*tapdb, tapweb, tapweb2"):
        check_devices(("tapx",), inventory(), str(tmp_path), str(tmp_path / "netns"))
    for bad in ("a/b", "x" * 16, "", "a b", "eth0:1"):
        with pytest.raises(KvmbpfError, match="not a network device name"):
            check_devices((bad,), inventory(), str(tmp_path), str(tmp_path / "netns"))


def test_drop_reasons_from_the_kernel_format():
    fmt = parse_format((FIXTURES / "kfree_skb.format").read_text())
    reasons = symbolic_tables(fmt.print_fmt)[0]
    assert reasons[3] == "NO_SOCKET" and reasons[12] == "NETFILTER_DROP" and reasons[80] == "FULL_RING"
    assert fmt.field("reason").size == 4 and fmt.field("location").size == 8


def test_kallsyms_symbolizes_text_symbols_only():
    syms = Kallsyms("ffffffff81000000 T _stext\nffffffff81001000 t tun_net_xmit\n"
                    "ffffffff81002000 d some_data\nffffffff81003000 T __udp4_lib_rcv\n")
    assert syms(0xFFFFFFFF81001010) == "tun_net_xmit+0x10"
    assert syms(0xFFFFFFFF81002010) == "tun_net_xmit+0x1010"     # data symbols are skipped
    assert syms(0xFFFFFFFF81003000) == "__udp4_lib_rcv+0x0"
    assert syms(0x1000) == "0x1000"


def test_kallsyms_hidden_addresses_give_hex():
    syms = Kallsyms("0000000000000000 T _stext\n0000000000000000 t tun_net_xmit\n")
    assert syms(0xFFFFFFFF81001010) == "0xffffffff81001010"


def test_build_rows_per_device_vm_forward_and_drop():
    devices = {1: Device("tapweb", "tap", "web", "br0"), 2: Device("br0", "bridge"),
               3: Device("tapweb2", "tap", "web", "br0")}
    kind = {k: i for i, k in enumerate(KINDS)}
    counts = Counts(
        traffic={(1, kind["rx_packets"]): 10, (1, kind["rx_bytes"]): 1000, (1, kind["tx_packets"]): 4,
                 (1, kind["tx_bytes"]): 400, (3, kind["tx_failed"]): 2, (2, kind["rx_packets"]): 10},
        forwards={(1, 3): 5},
        drops={(1, 2, 0xFFFFFFFF81003004, 3): 7, (3, 3, 0x10, 999): 1})
    devs, vms, fwds, drops = build(counts, devices, 2.0, {3: "NO_SOCKET"}, lambda a: f"f+{a & 0xff:#x}")
    tap = next(d for d in devs if d.dev == "tapweb")
    assert (tap.rx_packets, tap.rx_bytes, tap.tx_packets, tap.tx_bytes, tap.rx_pps) == (10, 1000, 4, 400, 5.0)
    assert len(vms) == 1 and vms[0].vm == "web" and sorted(vms[0].taps) == ["tapweb", "tapweb2"]
    assert (vms[0].rx_packets, vms[0].tx_failed, vms[0].drops) == (10, 2, 8)
    assert [(f.bridge, f.ingress, f.egress, f.packets) for f in fwds] == [("br0", "tapweb", "tapweb2", 5)]
    assert [(d.vm, d.dev, d.last_dev, d.reason, d.location, d.count) for d in drops] == [
        ("web", "tapweb", "br0", "NO_SOCKET", "f+0x4", 7), ("web", "tapweb2", "tapweb2", "reason 999", "f+0x10", 1)]


def test_snapshot_schema_and_tables():
    plan = choose_plan(host())
    snap = NetSnapshot(1.0, plan.describe(), [], [], [], [], 0, 4, ["a note"])
    data = plain(snap)
    assert set(data) == {"interval_s", "attach", "devices", "vms", "forwards", "drops", "overflow", "missed", "notes",
                         "plan", "protocols", "calls", "forward_latency"}
    assert "kprobes are not available" in snap.attach and "tracepoints (net:netif_receive_skb" in snap.attach
    assert snap.attach.startswith("tracepoints only")
    tables = snap.tables(10)
    assert [t.title.split()[0] for t in tables] == ["VMs", "devices"]
    assert any(n.startswith("4 events missed this interval") for n in tables[1].notes)
    assert tables[1].notes[0] == snap.attach and "net:" in snap.headline() and "[tracepoints]" in snap.headline()


ALL = frozenset(set(DEEP_FUNCTIONS) - {"dev_queue_xmit"} | {"__dev_queue_xmit"})


def host(kprobes=False, fentry=(False, "EPERM"), vmlinux=frozenset(), kallsyms=ALL, offsets=None) -> HostProbes:
    return HostProbes(offsets, kprobes, fentry, frozenset(vmlinux), frozenset(kallsyms))


def test_plan_prefers_fentry_then_kprobe_then_tracepoints():
    both = host(True, (True, "ok"), ALL)
    assert choose_plan(both).method == "fentry"
    assert "__dev_queue_xmit" in choose_plan(both).functions      # dev_queue_xmit is inline there
    modules = host(True, (True, "ok"), {"__dev_queue_xmit"})      # tun/bridge in modules
    plan = choose_plan(modules)
    assert plan.method == "kprobe" and set(plan.functions) == ALL
    assert "tun_get_user" in plan.why and "vmlinux functions only" in plan.why
    assert choose_plan(host(True, kallsyms=ALL - {"br_dev_xmit"})).why.startswith("not in this kernel: br_dev_xmit")
    none = choose_plan(host(vmlinux=ALL))
    assert none.method == "tracepoints" and "kprobes are not available" in none.why and "EPERM" in none.why
    assert choose_plan(host(True, offsets="no kernel BTF")) == Plan("tracepoints", why="no kernel BTF")


def test_plan_requested_or_one_line_error():
    assert choose_plan(host(True, (True, "ok"), ALL), "kprobe").method == "kprobe"
    assert choose_plan(host(True, (True, "ok"), ALL), "tracepoints").method == "tracepoints"
    with pytest.raises(KvmbpfError, match="--attach kprobe: kprobes are not available"):
        choose_plan(host(), "kprobe")
    with pytest.raises(KvmbpfError, match="--attach fentry: .*not in vmlinux BTF"):
        choose_plan(host(True, (True, "ok")), "fentry")


def test_struct_offsets_refuse_unexpected_sizes():
    fields = {("sk_buff", "head"): (192, 8), ("sk_buff", "data"): (200, 8), ("sk_buff", "tail"): (184, 4),
              ("sk_buff", "mac_header"): (182, 2), ("sk_buff", "dev"): (16, 8), ("net_device", "name"): (280, 16)}
    got = struct_offsets(lambda s, m: fields[(s, m)])
    assert got["SKB_MAC_OFF"] == 182 and got["NETDEV_NAME_OFF"] == 280
    fields[("sk_buff", "tail")] = (184, 8)          # a 32-bit kernel's pointer tail
    with pytest.raises(KvmbpfError, match="sk_buff.tail is 8 bytes at 184"):
        struct_offsets(lambda s, m: fields[(s, m)])


def test_protocol_call_and_latency_rows_and_dhcp_note():
    devices = {1: Device("tapweb", "tap", "web", "br0"), 2: Device("tapdb", "tap", "db", "br0"),
               3: Device("br0", "bridge")}
    p = {name: i for i, name in enumerate(PROTOS)}
    counts = Counts({}, {}, {},
                    protos={(1, 0, p["DHCP"], 1): 3, (1, 1, p["DHCP"], 2): 1, (1, 0, p["ARP"], 0): 2,
                            (2, 0, p["DHCP"], 1): 4, (2, 0, p["DHCP"], 0): 1, (3, 1, 99, 0): 1},
                    calls={(1, 0): 5, (3, 4): 2},
                    latency={(1, 2, 1, 20): 3, (1, 2, 1, 40): 1, (1, 2, 0, 20): 2})
    protos, calls, latency = build_packets(counts, devices)
    rows = {(r.dev, r.direction, r.label): r.packets for r in protos}
    assert rows == {("tapweb", "rx", "DHCP DISCOVER"): 3, ("tapweb", "tx", "DHCP OFFER"): 1,
                    ("tapweb", "rx", "ARP"): 2, ("tapdb", "rx", "DHCP DISCOVER"): 4, ("tapdb", "rx", "DHCP ?"): 1,
                    ("br0", "tx", "#99"): 1}
    assert [(c.dev, c.function, c.calls) for c in calls] == [("br0", "br_dev_xmit", 2), ("tapweb", "tun_get_user", 5)]
    assert [(f.ingress, f.egress, f.start, f.latency.count) for f in latency] == [
        ("tapweb", "tapdb", "netif_receive_skb", 2), ("tapweb", "tapdb", "tun_get_user", 4)]
    assert latency[0].bridge == "br0"
    assert dhcp_notes(protos, devices) == ["tapdb: 4 DHCPDISCOVER from the guest and no DHCPOFFER to it"]
    snap = NetSnapshot(1.0, "a", [], [], [], [], 0, 0, plan="kprobe", protocols=protos, calls=calls,
                       forward_latency=latency)
    titles = [t.title.split()[0] for t in snap.tables(10)]
    assert titles == ["VMs", "devices", "protocols", "kprobe", "forward"]


def test_ether_frame():
    frame = ether_frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:01", 0x88B5, 60)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x88\xb5"
    with pytest.raises(ValueError):
        ether_frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:01", 0x88B5, 10)
