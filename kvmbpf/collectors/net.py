"""Net: packets and bytes per VM tap and bridge, bridge forwards, and drops on a VM's path.

Attach plan, per host (the best the kernel allows): fentry > kprobe > tracepoints only.
The tracepoints always run (traffic, protocols, forwards, forward latency, drops); fentry
or kprobes add per-function call counts in tun and the bridge, and start the latency at
tun_get_user().  Struct fields (sk_buff, net_device) are read at offsets from the kernel's
BTF (kvmbpf.btf), never from headers, which may not match the kernel.  The devices traced are named in a
map (name -> small id): by default every tap of the VMs in scope plus the bridge
it is on, re-read from the inventory each interval; with --dev exactly the
devices given.  Directions are the device's own, as in its interface counters:
rx = received by the device (a tap: sent by the guest), tx = transmitted by it
(a tap: delivered towards the guest).
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import btf, kernel, tracefs
from ..errors import KvmbpfError
from ..hist import Histogram
from ..inventory import VM, Inventory, read_text
from ..snapshot import LATENCY_COLUMNS, Metric, TableData, latency_cells, loss_notes
from .base import BaseCollector, Scope, histograms

#: Counter kinds of net.bpf.c's `traffic` map, in order.
KINDS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "tx_failed")
TRACEPOINTS = ("net:netif_receive_skb", "net:net_dev_queue", "net:net_dev_xmit",
               "skb:kfree_skb", "skb:consume_skb")
MAX_DEVS = 1024    # net.bpf.c's traffic array: device ids at or above it count as overflow
_IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")


#: Protocol classes of net.bpf.c's `protos` map (P_*), in order.
PROTOS = ("other", "ARP", "IPv6", "ICMP", "DNS", "DHCP", "other UDP", "other TCP", "other IPv4")
DHCP_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK",
              7: "RELEASE", 8: "INFORM"}
#: Deep-probe functions of net.bpf.c (F_*), in order.  Each call is counted on a device:
#: tun_get_user on the tap it built an skb for, br_handle_frame and br_forward on the
#: ingress port, dev_queue_xmit on the transmitting device, br_dev_xmit on the bridge,
#: tun_net_xmit on the tap (towards the guest).
DEEP_FUNCTIONS = ("tun_get_user", "br_handle_frame", "br_forward", "dev_queue_xmit",
                  "br_dev_xmit", "tun_net_xmit")
LATENCY_START = ("netif_receive_skb", "tun_get_user")
#: sk_buff/net_device fields read in BPF: -D name -> (struct, member, size)
STRUCT_FIELDS = {"SKB_HEAD_OFF": ("sk_buff", "head", 8), "SKB_DATA_OFF": ("sk_buff", "data", 8),
                 "SKB_TAIL_OFF": ("sk_buff", "tail", 4), "SKB_MAC_OFF": ("sk_buff", "mac_header", 2),
                 "SKB_DEV_OFF": ("sk_buff", "dev", 8), "NETDEV_NAME_OFF": ("net_device", "name", 16)}
MAX_OFFSET = 4096


def struct_offsets(lookup=btf.member_offset) -> dict[str, int]:
    """-D parameters for the protocol view and deep probes, validated: a size that is not what
    the BPF code reads (the kernel changed the field) is an error, not a wrong read."""
    out = {}
    for param, (struct_name, member, size) in STRUCT_FIELDS.items():
        offset, got = lookup(struct_name, member)
        if got != size or not 0 <= offset < MAX_OFFSET:
            raise KvmbpfError(f"{struct_name}.{member} is {got} bytes at {offset} in this kernel's "
                              f"BTF; kvmbpf reads {size}")
        out[param] = offset
    return out


# ---- attach plan: fentry > kprobe > tracepoints -------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How kvmbpf net attaches on this host, and why not better."""
    method: str                          # "fentry", "kprobe" or "tracepoints"
    functions: tuple[str, ...] = ()      # kernel functions probed (fentry/kprobe)
    why: str = ""

    def describe(self) -> str:
        base = f"tracepoints ({', '.join(TRACEPOINTS)})"
        if self.method == "tracepoints":
            return f"tracepoints only: {base}; no tun/bridge function probes: {self.why}"
        return f"{self.method} on {', '.join(self.functions)} + {base}" + (f"; {self.why}" if self.why else "")


@dataclass(frozen=True)
class HostProbes:
    """What the host offers for deep probes (gathered by host_probes())."""
    offsets_error: str | None            # why struct offsets are unknown, or None
    kprobes: bool
    fentry: tuple[bool, str]
    in_vmlinux: frozenset[str]           # functions with vmlinux BTF (fentry-able by bcc 0.26)
    in_kallsyms: frozenset[str]          # functions the kernel has (kprobe-able)


def kernel_name(function: str, kallsyms: frozenset[str]) -> str:
    """__dev_queue_xmit has every transmit (since 5.19 dev_queue_xmit is an inline wrapper of
    it, whose out-of-line copies in modules would see only some)."""
    if function == "dev_queue_xmit" and "__dev_queue_xmit" in kallsyms:
        return "__dev_queue_xmit"
    return function


def choose_plan(host: HostProbes, requested: str = "auto") -> Plan:
    """The best attach method; with `requested` other than auto, that one or a one-line error."""
    names = tuple(kernel_name(f, host.in_kallsyms) for f in DEEP_FUNCTIONS)
    options: dict[str, Plan | str] = {}
    if host.offsets_error:
        options["fentry"] = options["kprobe"] = host.offsets_error
    else:
        missing = [n for n in names if n not in host.in_vmlinux]
        options["fentry"] = (f"{', '.join(missing)} not in vmlinux BTF (in modules; bcc 0.26 "
                             "attaches fentry to vmlinux functions only)" if missing
                             else f"fentry does not work here ({host.fentry[1]})" if not host.fentry[0]
                             else Plan("fentry", names))
        present = tuple(n for n in names if n in host.in_kallsyms)
        options["kprobe"] = ("kprobes are not available on this kernel (no kprobe PMU or "
                             "kprobe_events)" if not host.kprobes
                             else "none of the functions is in /proc/kallsyms" if not present
                             else Plan("kprobe", present, "" if present == names else
                                       "not in this kernel: " + ", ".join(sorted(set(names) - set(present)))))
    if requested == "tracepoints":
        return Plan("tracepoints", why="--attach tracepoints")
    if requested != "auto":
        chosen = options[requested]
        if isinstance(chosen, str):
            raise KvmbpfError(f"--attach {requested}: {chosen}")
        return chosen
    if isinstance(options["fentry"], Plan):
        return options["fentry"]
    if isinstance(options["kprobe"], Plan):
        plan = options["kprobe"]
        return Plan("kprobe", plan.functions, "; ".join(filter(None, [plan.why, f"not fentry: {options['fentry']}"])))
    return Plan("tracepoints", why=host.offsets_error or f"{options['kprobe']}; fentry: {options['fentry']}")


def host_probes(kallsyms_text: str | None = None) -> HostProbes:
    """Ask the running kernel (BTF, kallsyms, kprobe support, a trial fentry load)."""
    try:
        struct_offsets()
        vmlinux = btf.vmlinux()
        offsets_error = None
    except KvmbpfError as exc:
        return HostProbes(str(exc), False, (False, ""), frozenset(), frozenset())
    text = kallsyms_text if kallsyms_text is not None else read_text("/proc/kallsyms")
    wanted = set(DEEP_FUNCTIONS) | {"__dev_queue_xmit"}
    in_kallsyms = frozenset(parts[2] for parts in (line.split() for line in text.splitlines())
                            if len(parts) >= 3 and parts[2] in wanted and parts[1] in "tT")
    in_vmlinux = frozenset(n for n in wanted if vmlinux.has_function(n))
    deep = tuple(kernel_name(f, in_kallsyms) for f in DEEP_FUNCTIONS)
    # a trial fentry load costs a compile: only when fentry could be used at all
    fentry = kernel.fentry_works() if all(n in in_vmlinux for n in deep) else (False, "not tried")
    return HostProbes(offsets_error, kernel.has_kprobes(), fentry, in_vmlinux, in_kallsyms)



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
class ProtoStats:
    """Frames of one protocol on a device in one direction: rx = received by the device (a
    tap: from the guest), tx = queued for transmit on it (a tap: towards the guest)."""
    dev: str
    vm: str | None
    direction: str
    protocol: str
    dhcp: str | None             # DHCP message type (option 53) for DHCP, "?" when not found
    packets: int

    @property
    def label(self) -> str:
        return f"{self.protocol} {self.dhcp}" if self.dhcp else self.protocol


@dataclass
class CallStats:
    """Calls of a tun/bridge function counted on a traced device (see DEEP_FUNCTIONS)."""
    dev: str
    vm: str | None
    function: str
    calls: int


@dataclass
class ForwardLatency:
    """Time from an skb's start (its receive on `ingress`, or the tun_get_user() call that
    built it) to its successful transmit on `egress` (ns)."""
    bridge: str | None
    ingress: str
    egress: str
    start: str
    latency: Histogram


@dataclass
class NetSnapshot:
    interval_s: float
    attach: str
    devices: list[DeviceStats]
    vms: list[VMNetStats]
    forwards: list[Forward]
    drops: list[Drop]
    overflow: int                # counter updates lost since start because a map was full
    missed: int                  # events the kernel kept from the programs, this interval
    notes: list[str] = field(default_factory=list)
    plan: str = "tracepoints"    # fentry, kprobe or tracepoints
    protocols: list[ProtoStats] = field(default_factory=list)
    calls: list[CallStats] = field(default_factory=list)
    forward_latency: list[ForwardLatency] = field(default_factory=list)
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        rx = sum(d.rx_packets for d in self.devices if d.kind != "bridge")
        tx = sum(d.tx_packets for d in self.devices if d.kind != "bridge")
        rate = (lambda n: n / self.interval_s) if self.interval_s > 0 else (lambda n: 0.0)
        return (f"net: {len(self.devices)} device(s), rx {rx} ({rate(rx):.0f}/s), tx {tx} "
                f"({rate(tx):.0f}/s), {sum(d.count for d in self.drops)} drop(s) in "
                f"{self.interval_s:.2f}s [{self.plan}]")

    def tables(self, top: int) -> list[TableData]:
        notes = [self.attach] + self.notes + loss_notes(self.overflow, self.missed)
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
        if self.protocols:
            tables.append(TableData("protocols (rx = received by the device, tx = queued on it)",
                                    ["dev", "vm", "dir", "protocol", "packets"],
                                    [[p.dev, p.vm or "-", p.direction, p.label, p.packets]
                                     for p in self.protocols[:top]]))
        if self.calls:
            tables.append(TableData(f"{self.plan} calls per device", ["dev", "vm", "function", "calls"],
                                    [[c.dev, c.vm or "-", c.function, c.calls] for c in self.calls[:top]]))
        if self.forward_latency:
            tables.append(TableData("forward latency (start -> transmitted on egress)",
                                    ["ingress", "egress", "from", "count", *LATENCY_COLUMNS],
                                    [[f.ingress, f.egress, f.start, f.latency.count, *latency_cells(f.latency)]
                                     for f in self.forward_latency[:top]]))
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
    protos: dict[tuple, int] = field(default_factory=dict)    # (dev, dir, proto, dhcp) -> n
    calls: dict[tuple, int] = field(default_factory=dict)     # (dev, fn) -> n
    latency: dict[tuple, int] = field(default_factory=dict)   # (in_dev, out_dev, start, slot) -> n


def build_packets(counts: Counts, devices: dict[int, Device]) -> tuple[
        list[ProtoStats], list[CallStats], list[ForwardLatency]]:
    """Protocol, call and latency rows (pure, like build())."""
    def dev(i: int) -> Device:
        return devices.get(i, Device(f"dev#{i}", "device"))
    protos = sorted((ProtoStats(dev(d).name, dev(d).vm, ("rx", "tx")[direction], _name(PROTOS, proto),
                                (DHCP_TYPES.get(dhcp, f"type {dhcp}") if dhcp else "?")
                                if PROTOS[proto:proto + 1] == ("DHCP",) else None, n)
                     for (d, direction, proto, dhcp), n in counts.protos.items()),
                    key=lambda p: (p.dev, p.direction, -p.packets))
    calls = sorted((CallStats(dev(d).name, dev(d).vm, _name(DEEP_FUNCTIONS, fn), n)
                    for (d, fn), n in counts.calls.items()), key=lambda c: (c.dev, c.function))
    latency = [ForwardLatency(dev(i).bridge or dev(o).bridge, dev(i).name, dev(o).name,
                              _name(LATENCY_START, start), hist)
               for (i, o, start), hist in sorted(histograms(counts.latency).items())]
    return protos, calls, latency


def _name(names: tuple[str, ...], index: int) -> str:
    return names[index] if 0 <= index < len(names) else f"#{index}"


def dhcp_notes(protos: list[ProtoStats], devices: dict[int, Device]) -> list[str]:
    """The seed's DHCP question, answered per tap: DISCOVERs from the guest and no OFFER back."""
    taps = {d.name for d in devices.values() if d.kind == "tap"}
    count = lambda dev, direction, kind: sum(p.packets for p in protos if p.dev == dev  # noqa: E731
                                             and p.direction == direction and p.dhcp == kind)
    return [f"{tap}: {count(tap, 'rx', 'DISCOVER')} DHCPDISCOVER from the guest and no DHCPOFFER to it"
            for tap in sorted(taps) if count(tap, "rx", "DISCOVER") and not count(tap, "tx", "OFFER")]


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


def net_metrics(devices: list[DeviceStats], forwards: list[Forward], drops: list[Drop],
                protos: list[ProtoStats] = (), calls: list[CallStats] = ()) -> list[Metric]:
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
    for p in protos:
        out.append(Metric("kvmbpf_net_protocol_packets_total", "counter", "Frames per protocol",
                          {"dev": p.dev, "vm": p.vm or "", "direction": p.direction,
                           "protocol": p.label}, p.packets))
    for c in calls:
        out.append(Metric("kvmbpf_net_function_calls_total", "counter", "tun/bridge function calls",
                          {"dev": c.dev, "vm": c.vm or "", "function": c.function}, c.calls))
    return out


class NetCollector(BaseCollector):
    """kvmbpf net: traffic of VM taps and bridges, protocols, forwards, drops, deep probes."""

    program_name = "net"

    def __init__(self, scope: Scope, devs: tuple[str, ...] = (), attach: str = "auto"):
        if scope.vcpus:
            raise KvmbpfError("--vcpu does not apply to net (a VM's traffic is not per vCPU)")
        scope.refresh(strict=True)
        self.explicit = check_devices(devs, scope.inv) if devs else {}
        self.ids: dict[str, int] = {}
        self.devices: dict[int, Device] = {}
        self.reasons = tracefs.symbolic_table("skb", "kfree_skb", 0)
        self.symbolize = Kallsyms()
        host = host_probes()
        self.plan = choose_plan(host, attach)
        self.attach = self.plan.describe()
        params = {} if host.offsets_error else struct_offsets()
        self.maps = ["traffic", "forwards", "drops", "latency"] + ([] if host.offsets_error else ["protos"])
        self.notes = list(NOTES) + ([f"no protocol view: {host.offsets_error}"] if host.offsets_error else [])
        if self.plan.method != "tracepoints":
            self.maps.append("calls")
            params.update(DEEP_PROBES=1, DEEP_FENTRY=int(self.plan.method == "fentry"),
                          DEV_QUEUE_XMIT_INLINE=int("__dev_queue_xmit" in self.plan.functions))
        super().__init__(scope, {**params, "MAX_DEVS": MAX_DEVS})
        if self.plan.method == "kprobe":
            try:
                for function in self.plan.functions:
                    self.program.attach_kprobe(function, f"deep_{function}")
            except KvmbpfError:
                self.close()
                raise

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
        gen = self.program.table("filter_gen")    # after the changes: drops cached name -> id
        gen[0] = gen.Leaf(gen[0].value + 1)

    def device_counts(self) -> dict[str, dict[tuple, int]]:
        """`traffic` (a per-CPU array of one struct per device id) as the maps it replaces:
        traffic (dev, kind) -> n and protos (dev, dir, proto, 0) -> n; DHCP from `protos`."""
        traffic: dict[tuple, int] = {}
        protos = self.program.read("protos") if "protos" in self.maps else {}
        table = self.program.table("traffic")
        for dev in sorted(i for i in self.devices if i < MAX_DEVS):    # ids handed out so far
            per_cpu = table[table.Key(dev)]
            for kind in range(len(KINDS)):
                if n := sum(cpu.n[kind] for cpu in per_cpu):
                    traffic[(dev, kind)] = n
            for direction, proto in itertools.product((0, 1), range(len(PROTOS))):
                if n := sum(cpu.proto[direction * len(PROTOS) + proto] for cpu in per_cpu):
                    protos[(dev, direction, proto, 0)] = n
        return {"traffic": traffic, "protos": protos}

    def read(self, delta: bool) -> Counts:
        if not delta:
            return Counts(**{m: self.interval.last_counts.get(m, {}) for m in self.maps})
        current = self.device_counts()
        return Counts(**{m: self.interval.counts(m, current[m] if m in current else self.program.read(m))
                         for m in self.maps})

    def snapshot(self) -> NetSnapshot:
        self.refresh()
        elapsed = self.interval.tick()
        delta, total = self.read(True), self.read(False)
        rows = build(delta, self.devices, elapsed, self.reasons, self.symbolize)
        protos, calls, latency = build_packets(delta, self.devices)
        devices, _, forwards, drops = build(total, self.devices, 0, self.reasons, self.symbolize)
        total_protos, total_calls, _ = build_packets(total, self.devices)
        notes = (list(self.notes) + dhcp_notes(protos, self.devices) if self.ids
                 else ["no taps to trace (no VM with a tap in scope)"])
        return NetSnapshot(round(elapsed, 6), self.attach, *rows, overflow=self.overflow(),
                           missed=self.missed(), notes=notes, plan=self.plan.method, protocols=protos, calls=calls,
                           forward_latency=latency,
                           _metrics=net_metrics(devices, forwards, drops, total_protos, total_calls))
