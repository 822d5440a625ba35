"""`kvmbpf exits`: exit reasons and their latency, exits to the VMM, PIO/MMIO, emulated instructions."""
from __future__ import annotations

import click

from ..cli import emit_snapshots, main, tracing_options
from ..collectors.base import Scope
from ..errors import KvmbpfError


@main.command()
@tracing_options
@click.option("--include-idle", is_flag=True,
              help="Count idle exits (HLT, MWAIT) in the per-VM handling-latency summary.")
@click.option("--alert-rate", type=float, default=10_000.0, show_default=True,
              help="Flag a reason, port, address or emulated instruction above this many "
                   "events/s on one VM.")
@click.option("--emulated/--no-emulated", default=None,
              help="Trace the instructions KVM emulates (kvm_emulate_insn: one program run per "
                   "instruction).  Default: on where the host emulates guest code instead of "
                   "emitting kvm_exit (PVM), off elsewhere.")
def exits(vms, pids, vcpus, timing, as_json, top, include_idle, alert_rate, emulated) -> None:
    """Per VM and vCPU: why it exits (and how long that takes), what reaches the VMM, PIO and MMIO,
    and which instructions KVM emulates (the mnemonic shown is a hint from the first bytes).
    --top also bounds the emulated instructions kept per VM in --json output (busiest first)."""
    if not alert_rate > 0:
        raise KvmbpfError(f"--alert-rate must be > 0 (got {alert_rate:g})")
    from ..collectors.exits import ExitsCollector
    emit_snapshots(ExitsCollector(Scope(vms, pids, vcpus), include_idle, alert_rate, insn_rows=top,
                                  emulated=emulated), timing, as_json, top)
