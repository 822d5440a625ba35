"""`kvmbpf qemu probes` (what a VMM binary offers to uprobes) and `kvmbpf qemu trace` (count them)."""
from __future__ import annotations

import json
import shutil

import click

from ..cli import emit_snapshots, main, tracing_options
from ..collectors.base import Scope
from ..errors import KvmbpfError


@main.group()
def qemu() -> None:
    """QEMU internals through uprobes: list the VMM's probe points, count and time its functions."""


@qemu.command()
@click.argument("binary", required=False)
@click.option("--vm", "vm_name", help="Use the binary this VM runs.")
@click.option("--grep", "pattern", help="Only probe points matching this regular expression.")
@click.option("--json", "as_json", is_flag=True, help="Print as one JSON object.")
def probes(binary: str | None, vm_name: str | None, pattern: str | None, as_json: bool) -> None:
    """List the functions (.dynsym, .symtab, debug file) and USDT probes of a VMM binary."""
    from ..elfprobes import discover
    points = discover(_binary(binary, vm_name)).grep(pattern)
    funcs = sorted(points.functions.values(), key=lambda f: f.name)
    if as_json:
        click.echo(json.dumps({
            "binary": points.binary, "debug_file": points.debug_file,
            "functions": [{"name": f.name, "addr": f.addr, "size": f.size, "source": f.source}
                          for f in funcs],
            "usdt": [{"provider": p.provider, "name": p.name, "pc": p.pc, "semaphore": p.semaphore,
                      "args": p.args} for p in points.usdt]}))
        return
    click.echo(f"# {points.binary}: {len(funcs)} function(s), {len(points.usdt)} USDT probe(s), "
               f"debug file: {points.debug_file or 'none'}")
    for f in funcs:
        click.echo(f"func  {f.name}  0x{f.addr:x}  {f.size}  {f.source}")
    for p in points.usdt:
        click.echo(f"usdt  {p.label}  0x{p.pc:x}  sem=0x{p.semaphore:x}  {p.args}")


def _binary(binary: str | None, vm_name: str | None) -> str:
    """The ELF file to inspect: given, the one a VM runs, or qemu-system-x86_64 from PATH."""
    if binary and vm_name:
        raise KvmbpfError("give a BINARY or --vm, not both")
    if vm_name:
        from .. import inventory
        return inventory.scan().select((vm_name,))[0].vmm
    if binary:
        return binary
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise KvmbpfError("qemu-system-x86_64 is not in PATH: give a BINARY or --vm")
    return found


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


class FuncsThenTiming(click.Command):
    """`FUNC... [INTERVAL [COUNT]]`: names first, then up to two numbers.

    click fills fixed arguments from the right when a variadic one precedes
    them, so the words are split here: function names are C identifiers, the
    timing words are numbers.  The names go to ctx.meta["funcs"].
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        valued = {opt for p in self.get_params(ctx) if isinstance(p, click.Option) and not p.is_flag
                  for opt in p.opts}
        funcs, rest, words = [], [], iter(args)
        for word in words:
            if word.startswith("-") and not _is_number(word):
                rest.append(word)
                if word in valued:
                    rest.append(next(words, ""))
            elif _is_number(word):
                rest.append(word)
            else:
                funcs.append(word)
        ctx.meta["funcs"] = tuple(funcs)
        return super().parse_args(ctx, rest)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[OPTIONS] FUNC... [INTERVAL [COUNT]]"]


@qemu.command(cls=FuncsThenTiming)
@click.option("--set", "sets", multiple=True, metavar="blk|net|vcpu",
              help="A ready-made set of functions (repeatable): virtio-blk requests, "
                   "virtio-net TX/RX, vCPU run loop and MMIO/PIO dispatch.")
@click.option("--latency", is_flag=True, help="Also time each call (adds a uretprobe).")
@click.option("--max-rate", type=float, default=20000, show_default=True,
              help="Refuse functions called more often than this per second (measured for "
                   "the first second).")
@click.option("--force", is_flag=True, help="Trace even functions above --max-rate.")
@tracing_options
def trace(sets, latency, max_rate, force, vms, pids, vcpus, timing, as_json, top) -> None:
    """Count calls of VMM functions per VM and thread (vcpuN, worker, main); --latency times them.

    FUNC is a function the VM's binary exports (see `kvmbpf qemu probes`).
    Uprobes cost about 1.5 us per hit (a trap into the kernel on every call):
    a function called 20,000 times a second costs ~3 % of a CPU, so hotter ones
    are refused unless --force.
    """
    from ..collectors.qemu import QemuCollector
    funcs = click.get_current_context().meta["funcs"]
    if max_rate <= 0:
        raise KvmbpfError(f"--max-rate must be > 0 (got {max_rate:g})")
    if vcpus:
        raise KvmbpfError("qemu trace counts every VM thread (the output is per thread): drop --vcpu")
    guard = min(1.0, timing.interval or 1.0, timing.duration or 1.0)
    collector = QemuCollector(Scope(vms, pids), funcs, sets, latency, max_rate, force, guard)
    emit_snapshots(collector, timing, as_json, top)
