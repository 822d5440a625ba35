"""`kvmbpf net`: packets, bytes, bridge forwards and drops per VM tap and bridge."""
from __future__ import annotations

import click

from ..cli import emit_snapshots, main, tracing_options
from ..collectors.base import Scope


@main.command()
@tracing_options
@click.option("--dev", "--tap", "devs", multiple=True,
              help="Network device to trace (repeatable; default: the VMs' taps and their bridges).")
def net(vms, pids, vcpus, timing, as_json, top, devs) -> None:
    """Per VM and tap: packets/bytes each way, bridge forwards, drops by kernel reason."""
    from ..collectors.net import NetCollector
    collector = NetCollector(Scope(vms, pids, vcpus), tuple(devs))
    emit_snapshots(collector, timing, as_json, top)
