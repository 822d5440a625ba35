"""`kvmbpf blk`: block request latency, size, depth, merges and errors per VM and device."""
from __future__ import annotations

import click

from ..cli import emit_snapshots, main, tracing_options
from ..collectors.base import Scope


@main.command()
@tracing_options
@click.option("--dev", "devs", multiple=True,
              help="Block device: loop3, /dev/sda or 7:3 (repeatable; default: all).")
@click.option("--all", "all_io", is_flag=True,
              help="Every process's I/O, not only VMs' (non-VM I/O is labelled 'host').")
def blk(vms, pids, vcpus, timing, as_json, top, devs, all_io) -> None:
    """Per VM and device: request latency (queue/issue -> complete), size, depth, merges, errors."""
    from ..collectors.blk import BlkCollector, device_filter
    collector = BlkCollector(Scope(vms, pids, vcpus), device_filter(devs), all_io)
    emit_snapshots(collector, timing, as_json, top)
