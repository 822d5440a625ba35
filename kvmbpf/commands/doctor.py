"""`kvmbpf doctor`: what this kernel supports, what each gap disables, what to do."""
from __future__ import annotations

import dataclasses
import json
import sys

import click

from .. import kernel
from ..cli import console, main
from ..render.table import render_tables
from ..snapshot import TableData


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Check privileges, BPF, tracefs, BTF, headers, tracepoints, probes and /dev/kvm.

    Exit status 0 when at least one collector can run, 1 otherwise.
    """
    rep = kernel.collect()
    if as_json:
        click.echo(json.dumps({"checks": [dataclasses.asdict(c) for c in rep.checks],
                               "collectors": rep.collectors}, indent=2))
    else:
        rows = [["ok" if c.ok else ("warn" if c.warn else "FAIL"), c.name, c.detail,
                 "" if c.ok else c.affects, "" if c.ok else c.fix] for c in rep.checks]
        coll = [[name, "runs" if why is None else f"off: {why}"] for name, why in rep.collectors.items()]
        render_tables(console, "kvmbpf doctor", [
            TableData("Checks", ["status", "check", "detail", "disables", "to do"], rows),
            TableData("Collectors", ["collector", "status"], coll)])
    sys.exit(0 if rep.runnable else 1)
