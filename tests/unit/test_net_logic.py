"""kvmbpf net's pure logic: device selection and validation, row building, symbolization."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvmbpf.collectors.net import (KINDS, Counts, Device, Kallsyms, NetSnapshot, attach_method, build,
                                   check_devices, vm_devices)
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
    snap = NetSnapshot(1.0, attach_method(False), [], [], [], [], 0, ["a note"])
    data = plain(snap)
    assert set(data) == {"interval_s", "attach", "devices", "vms", "forwards", "drops", "overflow", "notes"}
    assert "kprobes are not available" in snap.attach and "tracepoints (net:netif_receive_skb" in snap.attach
    tables = snap.tables(10)
    assert [t.title.split()[0] for t in tables] == ["VMs", "devices"]
    assert tables[1].notes[0] == snap.attach and "net:" in snap.headline()


def test_ether_frame():
    frame = ether_frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:01", 0x88B5, 60)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x88\xb5"
    with pytest.raises(ValueError):
        ether_frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:01", 0x88B5, 10)
