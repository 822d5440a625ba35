"""Blk: block request latency, size, in-flight depth, merges, errors and requeues per VM and device.

Requests are attributed to a VM when they are queued: by device when exactly
one VM has that block device open (blk-throttle's held-back bios are queued by
a kworker, not by the VM), else by the queueing thread's process (the VMM's
threads); the BPF side carries the VM to the completion.
Two latencies per request: queue -> complete (what the VM waited for on the
host) and issue -> complete (the device alone).  The kernel side keeps one
cumulative row of counters and histograms per (vm pid, dev_t, operation) in a
per-CPU array (`rows` maps the key to its index); this side turns rows into
per-interval deltas with VM and device names.  block_bio_queue fires after
a cgroup I/O limit (blk-throttle) released the bio, so time spent held back by
such a limit is in neither latency.
"""
from __future__ import annotations

import ctypes
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..bpf import key_tuple
from ..errors import KvmbpfError
from ..hist import Histogram
from ..inventory import VM, bio_only_devices, block_device_name, kernel_dev, read_text
from ..snapshot import LATENCY_COLUMNS, Metric, TableData, latency_cells, loss_notes
from .base import BaseCollector, Scope, histograms

#: Operation codes of blk.bpf.c (OP_*), in order.
OPS = ("read", "write", "flush", "discard", "other")
#: Histograms of blk.bpf.c's struct row_stats (field names), by kind index.
KINDS = ("queue", "issue", "size", "depth")
QUEUE, ISSUE, SIZE, DEPTH = range(len(KINDS))
#: Counters of struct row_stats (field names); requests = the size histogram's count.
COUNTERS = ("bytes", "errors", "backmerges", "frontmerges", "rq_merges", "requeues")
#: Requests tracked in flight (blk.bpf.c's table: WAYS-way buckets; an entry that never
#: completes is evicted after 30 s when its bucket is full) and stats rows ((vm, device, op)
#: combinations: ~17 KB each per CPU).  The table is small on purpose: ~200 KB, so its
#: random accesses stay in cache (16384 entries cost +60 ns per request, benchmarks/README.md).
MAX_REQS = 4096
WAYS = 8
MAX_ROWS = 64
HOST = "host"   # label of I/O from processes that are not VMs (--all)

_MAJMIN_RE = re.compile(r"^(\d+):(\d+)$")


def parse_device(spec: str, sys: str = "/sys") -> tuple[int, int]:
    """A block device given as `loop3`, `/dev/loop3` or `7:3` -> (major, minor), or an error."""
    spec = spec.strip()
    m = _MAJMIN_RE.match(spec)
    if m:
        major, minor = int(m.group(1)), int(m.group(2))
        if Path(sys, "dev", "block", f"{major}:{minor}").exists():
            return major, minor
    else:
        name = spec[len("/dev/"):] if spec.startswith("/dev/") else spec
        if name and "/" not in name and name not in (".", ".."):
            dev = read_text(Path(sys, "class", "block", name, "dev")).strip()
            m = _MAJMIN_RE.match(dev)
            if m:
                return int(m.group(1)), int(m.group(2))
    raise KvmbpfError(f"no block device {spec!r} on this host (e.g. loop0, /dev/sda or 7:0)")


def split_dev(dev: int) -> tuple[int, int]:
    """The tracepoint dev_t encoding (MAJOR << 20 | MINOR) back to (major, minor)."""
    return dev >> 20, dev & ((1 << 20) - 1)


def device_label(dev: int) -> str:
    return block_device_name(*split_dev(dev))


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def vm_devices(scoped: list[VM], every_vm: list[VM],
               is_block: Callable[[str], bool] = is_block_device) -> dict[int, int]:
    """vm_devs content, dev_t -> VM pid: block devices that exactly one VM on the host has
    open and that hold no VM's image file (such a device, e.g. the host's own disk, carries
    other processes' I/O too), for the VMs in scope."""
    owners: dict[int, set[int]] = {}
    shared: set[int] = set()
    for vm in every_vm:
        for disk in vm.disks:
            owners.setdefault(disk.dev, set()).add(vm.pid)
            if not is_block(disk.path):
                shared.add(disk.dev)
    in_scope = {vm.pid for vm in scoped}
    return {dev: next(iter(pids)) for dev, pids in owners.items()
            if len(pids) == 1 and dev not in shared and pids <= in_scope}



@dataclass
class OpStats:
    """One VM's requests of one operation on one device."""
    vm: str
    pid: int
    device: str
    dev: str                       # major:minor
    op: str
    requests: int
    bytes: int
    errors: int
    queue_to_complete: Histogram   # ns; what the VM waited for on the host
    issue_to_complete: Histogram   # ns; the device alone
    size: Histogram                # bytes per request


@dataclass
class DeviceStats:
    """One VM's requests on one device, all operations."""
    vm: str
    pid: int
    device: str
    dev: str
    requests: int
    depth: Histogram               # traced requests in flight on the device at each issue
    backmerges: int
    frontmerges: int
    rq_merges: int
    requeues: int
    errors: int


@dataclass
class BlkSnapshot:
    interval_s: float
    ops: list[OpStats]
    devices: list[DeviceStats]
    overflow: int                  # requests not tracked since start (in-flight bucket or rows full)
    missed: int                    # events the kernel kept from the programs this interval
    expired: int                   # tracked requests evicted since start: no completion in 30 s
    _metrics: list[Metric] = field(default_factory=list)

    def headline(self) -> str:
        reqs = sum(o.requests for o in self.ops)
        rate = reqs / self.interval_s if self.interval_s > 0 else 0.0
        vms = len({d.pid for d in self.devices})
        return (f"blk: {reqs} requests ({rate:.0f}/s), {sum(o.bytes for o in self.ops) / 2**20:.1f} MiB, "
                f"{len({d.dev for d in self.devices})} device(s), {vms} source(s) "
                f"in {self.interval_s:.2f}s")

    def tables(self, top: int) -> list[TableData]:
        notes = loss_notes(self.overflow, self.missed)
        if self.overflow:
            notes.append(f"(blk: more than {WAYS} requests in flight hashed to one bucket of "
                         f"{MAX_REQS}/{WAYS}, or more than {MAX_ROWS} vm/device/op rows)")
        if self.expired:
            notes.append(f"{self.expired} requests evicted from the in-flight table: "
                         "no completion after 30 s")
        ops = sorted(self.ops, key=lambda o: -o.requests)[:top]
        lead = ["vm", "device", "op", "reqs", "KiB"]

        def cells(o: OpStats) -> list:
            return [o.vm, o.device, o.op, o.requests, round(o.bytes / 1024)]
        devices = sorted(self.devices, key=lambda d: -d.requests)[:top]
        return [
            TableData("queue -> complete (what the VM waited for on the host)",
                      lead + LATENCY_COLUMNS,
                      [cells(o) + latency_cells(o.queue_to_complete) for o in ops], notes),
            TableData("issue -> complete (the device)", lead + LATENCY_COLUMNS,
                      [cells(o) + latency_cells(o.issue_to_complete) for o in ops]),
            TableData("per device", ["vm", "device", "reqs", "depth p50", "depth max",
                                     "size p50", "merges b/f/rq", "requeues", "errors"],
                      [[d.vm, d.device, d.requests, _pct(d.depth, "p50"), d.depth.max() if d.depth.count else "-",
                        _size_p50(self.ops, d), f"{d.backmerges}/{d.frontmerges}/{d.rq_merges}",
                        d.requeues, d.errors] for d in devices]),
        ]

    def metrics(self) -> list[Metric]:
        return self._metrics


def _pct(hist: Histogram, key: str) -> str:
    return str(hist.percentiles().get(key, "-")) if hist.count else "-"


def _size_p50(ops: list[OpStats], dev: DeviceStats) -> str:
    sizes = [o.size for o in ops if o.pid == dev.pid and o.dev == dev.dev]
    total = sum(sizes, Histogram())
    return f"{total.percentiles()['p50'] / 1024:.3g}K" if total.count else "-"


#: Where each field of struct row_stats lies in a row read as u64s: name -> (start, length).
Layout = dict[str, tuple[int, int]]


def row_layout(leaf: type[ctypes.Structure]) -> Layout:
    """The layout of the compiled struct row_stats, from the type bcc built from it."""
    out = {}
    for name, ctype in leaf._fields_:
        out[name] = (getattr(leaf, name).offset // 8, ctypes.sizeof(ctype) // 8)
    return out


def sum_cpus(raw: bytes, ncpus: int) -> list[int]:
    """One per-CPU array value (ncpus copies of a struct of u64s) summed over CPUs."""
    words = memoryview(raw).cast("Q")
    width = len(words) // ncpus
    return [sum(col) for col in zip(*(words[c * width:(c + 1) * width] for c in range(ncpus)))]


def row_counts(refs: dict[tuple[int, int, int], int], rows: dict[int, list[int]],
               layout: Layout) -> tuple[dict[tuple, int], dict[tuple, int]]:
    """Stats rows (index -> summed u64s) of the keys in refs ((tgid, dev, op) -> index) as
    the rows build_stats takes: hists keyed (tgid, dev, op, kind, slot), counts keyed
    (tgid, dev, op, counter)."""
    hists: dict[tuple, int] = {}
    counts: dict[tuple, int] = {}
    for key, index in refs.items():
        words = rows.get(index)
        if words is None:
            continue
        for what, name in enumerate(COUNTERS):
            n = words[layout[name][0]]
            if n:
                counts[key + (what,)] = n
        for kind, name in enumerate(KINDS):
            first, length = layout[name]
            for slot, n in enumerate(words[first:first + length]):
                if n:
                    hists[key + (kind, slot)] = n
    return hists, counts


def build_stats(hists: dict[tuple, int], counts: dict[tuple, int], vm_name: Callable[[int], str],
                dev_name: Callable[[int], str]) -> tuple[list[OpStats], list[DeviceStats]]:
    """Rows from the maps' contents: hists keyed (tgid, dev, op, kind, slot),
    counts keyed (tgid, dev, op, counter).  Pure: used for deltas and for cumulative metrics."""
    by_kind = histograms(hists)
    counters: dict[tuple[int, int, int], dict[str, int]] = {}
    for (tgid, dev, op, what), n in counts.items():
        row = counters.setdefault((tgid, dev, op), {})
        row[COUNTERS[what]] = row.get(COUNTERS[what], 0) + n
    keys = {k[:3] for k in by_kind} | set(counters)
    ops: list[OpStats] = []
    devices: dict[tuple[int, int], DeviceStats] = {}
    for tgid, dev, op in sorted(keys):
        c = counters.get((tgid, dev, op), {})
        h = {kind: by_kind.get((tgid, dev, op, kind), Histogram()) for kind in range(4)}
        name, devname, majmin = vm_name(tgid), dev_name(dev), "%d:%d" % split_dev(dev)
        requests = h[SIZE].count            # one size sample per completed request
        if requests:
            ops.append(OpStats(name, tgid, devname, majmin, OPS[op] if op < len(OPS) else f"op{op}",
                               requests, c.get("bytes", 0), c.get("errors", 0),
                               h[QUEUE], h[ISSUE], h[SIZE]))
        d = devices.setdefault((tgid, dev), DeviceStats(name, tgid, devname, majmin, 0, Histogram(),
                                                        0, 0, 0, 0, 0))
        d.requests += requests
        d.depth = d.depth + h[DEPTH]
        for attr in ("backmerges", "frontmerges", "rq_merges", "requeues", "errors"):
            setattr(d, attr, getattr(d, attr) + c.get(attr, 0))
    return ops, list(devices.values())


def op_metrics(ops: list[OpStats], devices: list[DeviceStats]) -> list[Metric]:
    """Prometheus samples from cumulative rows."""
    out = []
    for o in ops:
        labels = {"vm": o.vm, "device": o.device, "op": o.op}
        out += [Metric("kvmbpf_blk_requests_total", "counter", "Completed block requests",
                       labels, o.requests),
                Metric("kvmbpf_blk_bytes_total", "counter", "Bytes of completed block requests",
                       labels, o.bytes),
                Metric("kvmbpf_blk_errors_total", "counter", "Block requests completed with an error",
                       labels, o.errors)]
        for interval, hist in (("queue", o.queue_to_complete), ("issue", o.issue_to_complete)):
            if hist.count:
                out.append(Metric("kvmbpf_blk_latency_seconds", "histogram",
                                  "Block request latency from queue or issue to completion",
                                  {**labels, "interval": interval}, hist=hist, scale=1e-9))
    for d in devices:
        labels = {"vm": d.vm, "device": d.device}
        for attr in ("backmerges", "frontmerges", "rq_merges", "requeues"):
            out.append(Metric(f"kvmbpf_blk_{attr}_total", "counter", f"Block {attr.replace('_', ' ')}",
                              labels, getattr(d, attr)))
    return out


class BlkCollector(BaseCollector):
    """kvmbpf blk: block requests per VM (or every process with all_io) and device."""

    program_name = "blk"

    def __init__(self, scope: Scope, devices: tuple[tuple[int, int], ...] = (), all_io: bool = False,
                 max_reqs: int = MAX_REQS):
        """max_reqs: in-flight table size (a power of two, at least WAYS; tests shrink it)."""
        if max_reqs < WAYS or max_reqs & (max_reqs - 1):
            raise KvmbpfError(f"blk: in-flight table size {max_reqs} is not a power of two >= {WAYS}")
        if all_io and (scope.names or scope.pids):
            raise KvmbpfError("--all traces every process's I/O: leave out --vm/--pid")
        if scope.vcpus:
            raise KvmbpfError("--vcpu does not apply to blk (VM I/O is submitted by VMM threads)")
        self.devs = [kernel_dev(major, minor) for major, minor in devices]
        self.all_io = all_io
        super().__init__(scope, {"ALL_IO": int(all_io), "FILTER_DEV": int(bool(self.devs)),
                                 "MAX_REQS": max_reqs, "WAYS": WAYS, "MAX_ROWS": MAX_ROWS})
        table = self.program.table("stats")
        self.layout = row_layout(table.sLeaf)

    def update_filters(self) -> None:
        super().update_filters()
        bio_only = [kernel_dev(major, minor) for major, minor in bio_only_devices()]
        self.program.fill("devs", device_map(vm_devices(self.scope.vms, self.scope.inv.vms),
                                             self.devs, bio_only))
        gen = self.program.table("filter_gen")    # after the fills: drops cached attributions
        gen[0] = gen.Leaf(gen[0].value + 1)

    def read_rows(self) -> tuple[dict[tuple, int], dict[tuple, int]]:
        """Cumulative (hists, counts) rows from the kernel's per-(vm, dev, op) stats."""
        table = self.program.table("stats")
        refs = {key_tuple(k): v.row for k, v in self.program.read_raw("rows")}
        rows = {index: sum_cpus(bytes(table[index]), table.total_cpu) for index in set(refs.values())}
        return row_counts(refs, rows, self.layout)

    def vm_name(self, tgid: int) -> str:
        return HOST if tgid == 0 else self.scope.vm_name(tgid)

    def snapshot(self) -> BlkSnapshot:
        self.refresh()
        elapsed = self.interval.tick()
        hists, counts = self.read_rows()
        ops, devices = build_stats(self.interval.counts("hists", hists),
                                   self.interval.counts("counts", counts), self.vm_name, device_label)
        cumulative = self.interval.last_counts
        metrics = op_metrics(*build_stats(cumulative.get("hists", {}), cumulative.get("counts", {}),
                                          self.vm_name, device_label))
        expired = sum(self.program.read("expired").values())
        return BlkSnapshot(round(elapsed, 6), ops, devices, self.overflow(), self.missed(),
                           expired, metrics)


#: `devs` values (NO_OWNER, NO_REQUESTS in blk.bpf.c): a traced device that no single VM
#: owns; a device whose bios never become requests (inventory.bio_only_devices), not tracked:
#: no completion would ever free their entries.
NO_OWNER = 0xFFFFFFFF
NO_REQUESTS = 0xFFFFFFFE


def device_map(owners: dict[int, int], traced: list[int], bio_only: list[int]) -> dict[int, int]:
    """`devs` content: with --dev, exactly those devices (owner VM or NO_OWNER, a miss
    drops the event); without, the VM-owned devices (a miss: attribute by thread).
    Bio-only devices are marked NO_REQUESTS either way."""
    devs = {dev: owners.get(dev, NO_OWNER) for dev in traced} if traced else dict(owners)
    return devs | {dev: NO_REQUESTS for dev in bio_only}


def device_filter(specs: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """--dev values validated against this host's block devices."""
    return tuple(dict.fromkeys(parse_device(spec) for spec in specs))

