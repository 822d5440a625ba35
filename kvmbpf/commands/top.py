"""`kvmbpf top`: a live per-VM view of every collector this kernel supports."""
from __future__ import annotations

import click

from ..cli import emit_snapshots, main, tracing_options
from ..collectors.base import Scope
from ..collectors.multi import FACTORIES, MultiCollector
from ..render.live import SORT_KEYS, State, Thresholds, run_live
from ..session import Timing

collectors_option = click.option(
    "--collector", "collectors", multiple=True, type=click.Choice(list(FACTORIES)),
    help="Run only this collector (repeatable; default: every one the kernel supports).")


@main.command()
@click.option("--sort", "sort_key", type=click.Choice(SORT_KEYS), default="exits/s",
              show_default=True, help="Initial sort column (key s cycles).")
@click.option("--filter", "name_filter", default="", help="Show VMs whose name contains this (key /).")
@click.option("--exit-alert", type=click.FloatRange(min=0, min_open=True), default=10_000,
              show_default=True, help="Flag a VM when one exit reason exceeds this rate (/s).")
@click.option("--steal-alert", type=click.FloatRange(min=0, min_open=True), default=10,
              show_default=True, help="Flag a VM whose mean vCPU steal exceeds this (%).")
@collectors_option
@tracing_options
def top(sort_key: str, name_filter: str, exit_alert: float, steal_alert: float,
        collectors: tuple[str, ...], vms, pids, vcpus, timing: Timing, as_json: bool,
        top: int) -> None:
    """Live per-VM view: exits, exit p99, steal, block IOPS/p99, packets (refresh INTERVAL, 2 s).

    Keys: q quit, s sort, / filter by name, up/down select, enter drill into
    a VM's vCPUs/reasons/devices, esc back.  With --vm NAME (one VM) the
    drill-down opens directly; with --json, one JSON line per interval instead.
    """
    multi = MultiCollector(Scope(vms, pids, vcpus), collectors)
    if as_json:
        emit_snapshots(multi, timing, as_json, top)
        return
    state = State(sort=sort_key, name_filter=name_filter,
                  drill=vms[0] if len(vms) == 1 else None)
    run_live(multi, timing.interval or 2.0, Thresholds(exit_alert, steal_alert), state,
             timing.count, timing.duration)
