"""Net: packets and bytes per VM tap and bridge, bridge forwards, and drops on a VM's path.

Attach method: tracepoints only (net.bpf.c).  The devices traced are named in a
map (name -> small id): by default every tap of the VMs in scope plus the bridge
it is on, re-read from the inventory each interval; with --dev exactly the
devices given.  Directions are the device's own, as in its interface counters:
rx = received by the device (a tap: sent by the guest), tx = transmitted by it
(a tap: delivered towards the guest).
"""
from __future__ import annotations

import bisect
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracefs
from ..errors import KvmbpfError
from ..inventory import VM, Inventory
from ..snapshot import Metric, TableData
from .base import BaseCollector, Scope

#: Counter kinds of net.bpf.c's `traffic` map, in order.
KINDS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "tx_failed")
IFNAMSIZ = 16
TRACEPOINTS = ("net:netif_receive_skb", "net:net_dev_queue", "net:net_dev_xmit",
               "skb:kfree_skb", "skb:consume_skb")
_IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")


def attach_method(kprobes: bool) -> str:
    """What kvmbpf net attaches to and why (shown with every output)."""
    why = ("kprobes are not available on this kernel (no kprobe_events in tracefs), so tun and "
           "bridge internals (tun_get_user, tun_net_xmit, br_forward) are not probed"
           if not kprobes else "tun/bridge kprobes are not used")
    return f"tracepoints ({', '.join(TRACEPOINTS)}); {why}"


def kprobes_available() -> bool:
    try:
        return (tracefs.tracefs_root() / "kprobe_events").exists()
    except KvmbpfError:
        return False


# ---- which devices ------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """A traced network device and what it belongs to."""
    name: str
    kind: str                    # "tap" (a VM's), "bridge", "device" (given with --dev)
    vm: str | None = None
    bridge: str | None = None


def vm_devices(vms: list[VM]) -> dict[str, Device]:
    """Every tap of these VMs and the bridge each is on."""
    out: dict[str, Device] = {}
    for vm in vms:
        for tap in vm.taps:
            out[tap.name] = Device(tap.name, "tap", vm.name, tap.bridge)
            if tap.bridge:
                out.setdefault(tap.bridge, Device(tap.bridge, "bridge"))
    return out


def known_devices(inv: Inventory, sys: str = "/sys", netns_dir: str = "/run/netns") -> dict[str, Device]:
    """Devices --dev may name: the inventory's taps and bridges, /sys/class/net, and the
    devices of the named network namespaces."""
    names = set(_listdir(Path(sys, "class", "net")))
    for ns in _listdir(Path(netns_dir)):
        names.update(netns_links(ns))
    out = {name: Device(name, "device") for name in names}
    out.update(vm_devices(inv.vms))
    return out


def netns_links(netns: str) -> list[str]:
    """Interface names in a named network namespace (`ip -n NS link`)."""
    try:
        proc = subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True,
                              text=True, timeout=5, check=False)
        return [link["ifname"] for link in json.loads(proc.stdout or "[]")]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def check_devices(names: tuple[str, ...], inv: Inventory, sys: str = "/sys",
                  netns_dir: str = "/run/netns") -> dict[str, Device]:
    """The --dev/--tap devices, validated; an unknown or malformed name is a one-line error."""
    known = known_devices(inv, sys, netns_dir)
    out = {}
    for name in names:
        if not _IFNAME_RE.match(name):
            raise KvmbpfError(f"{name!r} is not a network device name (1-15 characters, no '/', ':' or spaces)")
        if name not in known:
            taps = ", ".join(sorted(d for d, v in known.items() if v.kind == "tap")) or "none"
            raise KvmbpfError(f"no network device {name!r} (VM taps: {taps}; see `ip link`)")
        out[name] = known[name]
    return out


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# ---- code locations --------------------------------------------------------------------------
class Kallsyms:
    """Kernel addresses -> 'function+0xoff' from /proc/kallsyms (hex when not readable)."""

    def __init__(self, text: str | None = None):
        self._text = text
        self._addrs: list[int] | None = None
        self._names: list[str] = []

    def _load(self) -> None:
        text = self._text
        if text is None:
            try:
                text = Path("/proc/kallsyms").read_text()
            except OSError:
                text = ""
        pairs = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                addr = int(parts[0], 16)
                if addr:
                    pairs.append((addr, parts[2]))
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def __call__(self, addr: int) -> str:
        if self._addrs is None:
            self._load()
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or not addr:
            return hex(addr)
        return f"{self._names[i]}+{addr - self._addrs[i]:#x}"


# ---- snapshot -------------------------------------------------------------------------------
@dataclass
class DeviceStats:
    """One device's traffic in the interval (rx: received by the device; a tap's rx comes
    from the guest; tx: transmitted, a tap's tx goes to the guest; bytes: Ethernet frames
    without FCS)."""
    dev: str
    kind: str
    vm: str | None
    bridge: str | None
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_failed: int = 0           # transmits the driver refused (tun: guest queue full)
    rx_pps: float = 0.0
    tx_pps: float = 0.0
    rx_bytes_per_s: float = 0.0
    tx_bytes_per_s: float = 0.0


@dataclass
class VMNetStats:
    """A VM's taps together: rx = sent by the guest, tx = sent to the guest."""
    vm: str
    taps: list[str]
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    tx_failed: int
    drops: int


@dataclass
class Forward:
    """skbs a traced device received and the bridge passed on, unchanged, to another one."""
    bridge: str | None
    ingress: str
    egress: str
    packets: int


@dataclass
class Drop:
    """skbs freed as dropped after being seen on a traced device."""
    vm: str | None
    dev: str                     # first traced device the skb was seen on
    last_dev: str                # last traced device it was seen on
    reason: str                  # the kernel's drop reason name (skb:kfree_skb)
    reason_code: int
    location: str                # where it was freed (function+offset)
    count: int


@dataclass
class NetSnapshot:
    interval_s: float
    attach: str
    devices: list[DeviceStats]
    vms: list[VMNetStats]
    forwards: list[Forward]
    drops: list[Drop]
    overflow: int                # counter updates lost since start because a map was full
    notes: list[str] = field(default_factory=list)
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        rx = sum(d.rx_packets for d in self.devices if d.kind != "bridge")
        tx = sum(d.tx_packets for d in self.devices if d.kind != "bridge")
        rate = (lambda n: n / self.interval_s) if self.interval_s > 0 else (lambda n: 0.0)
        return (f"net: {len(self.devices)} device(s), rx {rx} ({rate(rx):.0f}/s), tx {tx} "
                f"({rate(tx):.0f}/s), {sum(d.count for d in self.drops)} drop(s) in "
                f"{self.interval_s:.2f}s [tracepoints]")

    def tables(self, top: int) -> list[TableData]:
        notes = [self.attach] + self.notes
        if self.overflow:
            notes.append(f"{self.overflow} counter updates lost since start (a map was full)")
        devices = sorted(self.devices, key=lambda d: -(d.rx_packets + d.tx_packets))[:top]
        tables = [
            TableData("VMs (rx = from the guest, tx = to the guest)",
                      ["vm", "taps", "rx pkts", "rx bytes", "tx pkts", "tx bytes", "tx failed", "drops"],
                      [[v.vm, " ".join(v.taps), v.rx_packets, v.rx_bytes, v.tx_packets, v.tx_bytes,
                        v.tx_failed, v.drops] for v in self.vms[:top]]),
            TableData("devices (rx/tx as in the device's interface counters)",
                      ["dev", "vm/bridge", "rx pkts", "rx pkt/s", "rx bytes", "tx pkts", "tx pkt/s",
                       "tx bytes", "tx failed"],
                      [[d.dev, d.vm or (f"on {d.bridge}" if d.bridge else d.kind), d.rx_packets,
                        f"{d.rx_pps:.0f}", d.rx_bytes, d.tx_packets, f"{d.tx_pps:.0f}", d.tx_bytes,
                        d.tx_failed] for d in devices], notes),
        ]
        if self.forwards:
            tables.append(TableData("bridge forwards", ["bridge", "ingress", "egress", "packets"],
                                    [[f.bridge or "-", f.ingress, f.egress, f.packets]
                                     for f in self.forwards[:top]]))
        if self.drops:
            tables.append(TableData("drops (skbs seen on a traced device)",
                                    ["vm", "dev", "last dev", "reason", "location", "count"],
                                    [[d.vm or "-", d.dev, d.last_dev, d.reason, d.location, d.count]
                                     for d in self.drops[:top]]))
        return tables

    def metrics(self) -> list[Metric]:
        return self._metrics


NOTES = [
    "forwards: skbs passed on unchanged (known unicast); flooded copies are clones, counted only as tx",
    "tx failed on a tap: the guest did not read fast enough (tun's queue full, drop reason FULL_RING)",
    "device names are per network namespace: same-named devices elsewhere are counted together",
]


@dataclass
class Counts:
    """One read of the maps (cumulative or a delta), keyed by device id."""
    traffic: dict[tuple, int]    # (dev, kind) -> n
    forwards: dict[tuple, int]   # (in_dev, out_dev) -> n
    drops: dict[tuple, int]      # (origin, last, location, reason) -> n


def build(counts: Counts, devices: dict[int, Device], elapsed: float,
          reasons: dict[int, str], symbolize) -> tuple[list[DeviceStats], list[VMNetStats],
                                                       list[Forward], list[Drop]]:
    """Typed rows from map contents (pure: used for deltas and cumulative metrics)."""
    def dev(i: int) -> Device:
        return devices.get(i, Device(f"dev#{i}", "device"))
    stats: dict[int, DeviceStats] = {}
    for (i, kind), n in counts.traffic.items():
        d = dev(i)
        row = stats.setdefault(i, DeviceStats(d.name, d.kind, d.vm, d.bridge))
        setattr(row, KINDS[kind], getattr(row, KINDS[kind]) + n)
    if elapsed > 0:
        for row in stats.values():
            row.rx_pps, row.tx_pps = row.rx_packets / elapsed, row.tx_packets / elapsed
            row.rx_bytes_per_s, row.tx_bytes_per_s = row.rx_bytes / elapsed, row.tx_bytes / elapsed
    forwards = sorted((Forward(dev(i).bridge or dev(o).bridge, dev(i).name, dev(o).name, n)
                       for (i, o), n in counts.forwards.items()), key=lambda f: -f.packets)
    drops = sorted((Drop(dev(first).vm or dev(last).vm, dev(first).name, dev(last).name,
                         reasons.get(reason, f"reason {reason}"), reason, symbolize(loc), n)
                    for (first, last, loc, reason), n in counts.drops.items()),
                   key=lambda d: -d.count)
    return list(stats.values()), per_vm(stats.values(), drops), forwards, drops


def per_vm(stats, drops: list[Drop]) -> list[VMNetStats]:
    """Sum the taps of each VM."""
    vms: dict[str, VMNetStats] = {}
    for s in stats:
        if s.vm is None:
            continue
        v = vms.setdefault(s.vm, VMNetStats(s.vm, [], 0, 0, 0, 0, 0, 0))
        v.taps.append(s.dev)
        for attr in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "tx_failed"):
            setattr(v, attr, getattr(v, attr) + getattr(s, attr))
    for d in drops:
        if d.vm in vms:
            vms[d.vm].drops += d.count
    return sorted(vms.values(), key=lambda v: v.vm)


def net_metrics(devices: list[DeviceStats], forwards: list[Forward], drops: list[Drop]) -> list[Metric]:
    """Prometheus samples from cumulative rows."""
    out = []
    for d in devices:
        labels = {"dev": d.dev, "vm": d.vm or "", "bridge": d.bridge or ""}
        for direction in ("rx", "tx"):
            out += [Metric("kvmbpf_net_packets_total", "counter", "Packets per device and direction",
                           {**labels, "direction": direction}, getattr(d, f"{direction}_packets")),
                    Metric("kvmbpf_net_bytes_total", "counter", "Frame bytes per device and direction",
                           {**labels, "direction": direction}, getattr(d, f"{direction}_bytes"))]
        out.append(Metric("kvmbpf_net_tx_failed_total", "counter", "Transmits the driver refused",
                          labels, d.tx_failed))
    for f in forwards:
        out.append(Metric("kvmbpf_net_forwards_total", "counter", "Bridge forwards between traced ports",
                          {"bridge": f.bridge or "", "ingress": f.ingress, "egress": f.egress}, f.packets))
    for d in drops:
        out.append(Metric("kvmbpf_net_drops_total", "counter", "Dropped skbs seen on a traced device",
                          {"vm": d.vm or "", "dev": d.dev, "reason": d.reason, "location": d.location},
                          d.count))
    return out


class NetCollector(BaseCollector):
    """kvmbpf net: traffic of VM taps and bridges, forwards and drops."""

    program_name = "net"

    def __init__(self, scope: Scope, devs: tuple[str, ...] = ()):
        if scope.vcpus:
            raise KvmbpfError("--vcpu does not apply to net (a VM's traffic is not per vCPU)")
        scope.refresh(strict=True)
        self.explicit = check_devices(devs, scope.inv) if devs else {}
        self.ids: dict[str, int] = {}
        self.devices: dict[int, Device] = {}
        self.reasons = tracefs.symbolic_table("skb", "kfree_skb", 0)
        self.symbolize = Kallsyms()
        self.attach = attach_method(kprobes_available())
        super().__init__(scope)

    def wanted(self) -> dict[str, Device]:
        return self.explicit or vm_devices(self.scope.vms)

    def update_filters(self) -> None:
        """traced_devs holds exactly the wanted names; ids are never reused, so a device
        that goes and comes back keeps its counters."""
        wanted = self.wanted()
        table = self.program.table("traced_devs")
        current = {bytes(k.name).rstrip(b"\0").decode(): v.value for k, v in table.items()}
        for name in set(current) - set(wanted):
            del table[table.Key(name.encode())]
        for name, device in wanted.items():
            ident = self.ids.setdefault(name, len(self.ids) + 1)
            self.devices[ident] = device
            if current.get(name) != ident:
                table[table.Key(name.encode())] = table.Leaf(ident)

    def read(self, delta: bool) -> Counts:
        get = self.read_delta if delta else (lambda m: self.interval.last_counts.get(m, {}))
        return Counts(get("traffic"), get("forwards"), get("drops"))

    def snapshot(self) -> NetSnapshot:
        self.refresh()
        elapsed = self.interval.tick()
        rows = build(self.read(True), self.devices, elapsed, self.reasons, self.symbolize)
        cumulative = build(self.read(False), self.devices, 0, self.reasons, self.symbolize)
        notes = list(NOTES) if self.ids else ["no taps to trace (no VM with a tap in scope)"]
        devices, _, forwards, drops = cumulative
        return NetSnapshot(round(elapsed, 6), self.attach, *rows, overflow=self.overflow(),
                           notes=notes,
                           _metrics=net_metrics(devices, forwards, drops))
