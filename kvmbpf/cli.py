"""The kvmbpf command line: one thin subcommand per question, over the Python API."""
from __future__ import annotations

import functools
import json
import sys
import time

import click
from rich.console import Console

from . import inventory
from .errors import KvmbpfError
from .session import Timing, run

console = Console()


class Group(click.Group):
    """Turns KvmbpfError (and click's usage errors) into one line and exit status 2."""

    def main(self, *args, **kwargs):
        kwargs.setdefault("standalone_mode", False)
        try:
            return super().main(*args, **kwargs)
        except KvmbpfError as exc:
            click.echo(f"kvmbpf: error: {exc}", err=True)
            sys.exit(2)
        except PermissionError as exc:
            click.echo(f"kvmbpf: error: permission denied: {exc.filename or exc} "
                       "(kvmbpf needs root, or CAP_BPF and CAP_PERFMON)", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"kvmbpf: error: {exc.format_message()}", err=True)
            sys.exit(2)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmbpf")
def main() -> None:
    """eBPF tracing for KVM hosts: per-VM answers from in-kernel aggregates."""


def tracing_options(func):
    """The options every tracing command shares (bcc tools / kvm_stat conventions)."""
    @click.argument("interval", type=float, required=False)
    @click.argument("count", type=int, required=False)
    @click.option("--vm", "vms", multiple=True, help="VM name (repeatable).")
    @click.option("--pid", "pids", multiple=True, type=int, help="VMM process id (repeatable).")
    @click.option("--vcpu", "vcpus", multiple=True, type=int, help="vCPU index (repeatable).")
    @click.option("-d", "--duration", type=float, help="Stop after this many seconds.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per interval.")
    @click.option("--top", type=int, default=10, show_default=True, help="Rows per table.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if kwargs["top"] <= 0:
            raise KvmbpfError(f"--top must be > 0 (got {kwargs['top']})")
        kwargs["timing"] = Timing(kwargs.pop("interval"), kwargs.pop("count"),
                                  kwargs.pop("duration")).validate()
        if kwargs["timing"].interval is None and kwargs["timing"].count is not None:
            raise KvmbpfError("a count needs an interval (e.g. `1 10`)")
        return func(*args, **kwargs)
    return wrapper


def emit_snapshots(collector, timing: Timing, as_json: bool, top: int) -> None:
    """Run a collector to completion, printing each interval as a table or a JSON line."""
    from .render.jsonl import write_snapshot
    from .render.table import render_tables

    def emit(snapshot) -> None:
        if as_json:
            write_snapshot(snapshot)
        else:
            stamp = time.strftime("%H:%M:%S")
            render_tables(console, f"{stamp}  {snapshot.headline()}", snapshot.tables(top))
    if not as_json:
        console.print(f"[dim]Tracing... {'Ctrl-C to stop' if timing.interval or not timing.duration else f'{timing.duration:g}s'}[/dim]")
    run(collector, timing, emit)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the inventory as JSON.")
def vms(as_json: bool) -> None:
    """List the KVM VMs on this host: names, vCPU threads, taps, disks."""
    inv = inventory.scan()
    if as_json:
        click.echo(json.dumps([vm.to_dict() for vm in inv.vms], indent=2))
        return
    if not inv.vms:
        console.print("No KVM VMs on this host (try `kvmbpf lab up`).")
        return
    from .render.table import render_tables
    from .snapshot import TableData
    rows = [[vm.name, vm.pid, vm.vmm.rsplit("/", 1)[-1],
             " ".join(f"{t.vcpu}:{t.tid}" for t in vm.vcpus) or "-",
             len(vm.threads),
             " ".join(f"{t.name}({t.bridge or '-'})" for t in vm.taps) or "-",
             " ".join(f"{d.devname}" + (f"<{d.backing}>" if d.backing else "") for d in vm.disks) or "-"]
            for vm in inv.vms]
    render_tables(console, f"{len(inv.vms)} VM(s)", [TableData(
        "VMs", ["name", "pid", "vmm", "vcpu:tid", "threads", "taps(bridge)", "disks"], rows)])


from . import commands  # noqa: E402,F401  (registers the other subcommands)
