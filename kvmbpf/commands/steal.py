"""`kvmbpf steal` (run-queue delay of vCPU threads, by culprit) and `kvmbpf cpu` (/proc accounting)."""
from __future__ import annotations

from ..cli import emit_snapshots, main, tracing_options
from ..collectors.base import Scope


@main.command()
@tracing_options
def steal(vms, pids, vcpus, timing, as_json, top) -> None:
    """Per vCPU: how long it waited for a host CPU (guest steal), and which tasks held it."""
    from ..collectors.steal import StealCollector
    emit_snapshots(StealCollector(Scope(vms, pids, vcpus)), timing, as_json, top)


@main.command()
@tracing_options
def cpu(vms, pids, vcpus, timing, as_json, top) -> None:
    """Per VM: guest, VMM user, host kernel and run-queue time of its threads (/proc, no tracing)."""
    from ..collectors.cpu import CpuCollector
    emit_snapshots(CpuCollector(Scope(vms, pids, vcpus)), timing, as_json, top)
