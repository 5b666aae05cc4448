"""The `lemoe` command line: parses arguments and renders; the work happens in `lemoe_store.repo`."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import LemoeError
from .output import err_console


class _Group(TyperGroup):
    """Turns a user error (a `LemoeError`) raised anywhere below into one red line on stderr and exit
    code 1; any other exception is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LemoeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="lemoe",
    help="A git-like, versioned store for lifelong model editing (LEMoE adaptors on Hugging Face LMs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lemoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Edit a language model fact by fact; every edit batch is a commit you can log, check out and undo."""


from . import bench_cmds, history_cmds, quickstart, serve_cmds, sharing_cmds, store_cmds  # noqa: E402  (they register their commands on `app`)

store_cmds.register(app)
history_cmds.register(app)
sharing_cmds.register(app)
serve_cmds.register(app)
bench_cmds.register(app)
quickstart.register(app)


def main() -> None:
    app()
