"""Terminal tables with rich, from any Snapshot's tables() (no BPF knowledge here)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..snapshot import TableData


def render_tables(console: Console, header: str, tables: list[TableData]) -> None:
    console.print(f"[bold]{header}[/bold]")
    for data in tables:
        table = Table(title=data.title, title_justify="left", show_edge=False, pad_edge=False)
        for col in data.columns:
            table.add_column(col, justify="left" if not data.rows or isinstance(
                data.rows[0][data.columns.index(col)], str) else "right")
        for row in data.rows:
            table.add_row(*(str(c) for c in row))
        if data.rows:
            console.print(table)
        else:
            console.print(f"[dim]{data.title}: nothing in this interval[/dim]")
        for note in data.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
