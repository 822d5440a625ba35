"""`kvmbpf net`: packets, bytes, bridge forwards and drops per VM tap and bridge."""
from __future__ import annotations

import click

from ..cli import emit_snapshots, main, tracing_options
from ..collectors.base import Scope


@main.command()
@tracing_options
@click.option("--dev", "--tap", "devs", multiple=True,
              help="Network device to trace (repeatable; default: the VMs' taps and their bridges).")
@click.option("--attach", type=click.Choice(["auto", "fentry", "kprobe", "tracepoints"]), default="auto",
              show_default=True, help="How to attach: the best this kernel allows, or exactly this.")
def net(vms, pids, vcpus, timing, as_json, top, devs, attach) -> None:
    """Per VM and tap: packets/bytes each way, protocols (ARP, DHCP by message type, DNS, ...),
    bridge forwards and their latency, drops by kernel reason; with kprobes or fentry, calls of
    tun and bridge functions."""
    from ..collectors.net import NetCollector
    collector = NetCollector(Scope(vms, pids, vcpus), tuple(devs), attach)
    emit_snapshots(collector, timing, as_json, top)
