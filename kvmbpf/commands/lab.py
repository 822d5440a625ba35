"""`kvmbpf lab up|down|status`: real QEMU/KVM guests to try kvmbpf on."""
from __future__ import annotations

import json

import click

from ..cli import console, main
from ..lab.lab import WORKLOADS, Lab, labs


@main.group()
def lab() -> None:
    """The built-in lab of QEMU/KVM guests with known workloads."""


@lab.command()
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="exits", show_default=True)
@click.option("--name", default="kvmbpf-demo", show_default=True, help="VM name.")
@click.option("--id", "lab_id", default="default", show_default=True, help="Lab id (several can coexist).")
@click.option("--no-disk", is_flag=True, help="No loop-device data disk.")
@click.option("--no-net", is_flag=True, help="No tap/bridge/dnsmasq network.")
def up(workload: str, name: str, lab_id: str, no_disk: bool, no_net: bool) -> None:
    """Start a lab VM (and its loop disk and network)."""
    the_lab = Lab(lab_id)
    try:
        vm = the_lab.up(workload, name, disk=not no_disk, net=not no_net)
    except BaseException:
        the_lab.down()
        raise
    console.print(f"lab {lab_id}: VM [bold]{vm.name}[/bold] pid {vm.pid} running '{workload}'"
                  + (f", disk {vm.disk}" if vm.disk else "") + (f", tap {vm.tap} in {vm.netns}" if vm.tap else ""))


@lab.command()
@click.option("--id", "lab_id", default=None, help="Lab id (default: every lab).")
def down(lab_id: str | None) -> None:
    """Stop the lab's VMs and remove every device and namespace it made."""
    for ident in [lab_id] if lab_id else labs():
        Lab(ident).down()
        console.print(f"lab {ident}: down")


@lab.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """What each lab is running."""
    states = [Lab(ident).status() for ident in labs()]
    if as_json:
        click.echo(json.dumps(states, indent=2))
        return
    if not states:
        console.print("no lab is up")
    for st in states:
        vms = ", ".join(f"{v['name']} (pid {v['pid']}, {'running' if v['running'] else 'stopped'})"
                        for v in st["vms"]) or "no VMs"
        console.print(f"lab {st['lab']}: {vms}; loops {[l['device'] for l in st['loops']]}; "
                      f"netns {st['networks']}")
