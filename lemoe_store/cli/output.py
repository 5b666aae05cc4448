"""Shared rendering for every command: one `--json` option, one error path, one console."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
WorkersOption = Annotated[int, typer.Option("--workers", help="Train the batches at once in N local processes.")]
RayOption = Annotated[str | None, typer.Option(
    "--ray", is_flag=False, flag_value="local", metavar="[ADDRESS]",
    help="Train the batches on a Ray cluster (at ADDRESS; alone: a local one). Needs lemoe-store[ray].")]
StoreOption = Annotated[
    str | None, typer.Option("--store", envvar="LEMOE_DIR", help="Store path (default: .lemoe here or above).")
]


def print_table(table: Table) -> None:
    """A table, whole. On a terminal rich fits it to the screen; piped or redirected (a log, a file) there is
    no screen, and rich's 80-column default would squeeze wide tables' columns to nothing, so it is printed
    at its natural width."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    Console(width=natural).print(table)


def print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def fail(message: str, code: int = 1) -> None:
    """One line on stderr, non-zero exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def short(cid: str | None) -> str:
    return cid[:12] if cid else "-"


def fmt(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("-" if value is None else str(value))
