"""Sharing commands: remote, push, pull, clone (through DVC) and export of one version."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ..repo import Repo
from .output import JsonOption, StoreOption, console, print_json, short

remote_app = typer.Typer(help="Manage the DVC remotes this store pushes to and pulls from.", no_args_is_help=True)


@remote_app.command("add")
def remote_add(
    name: Annotated[str, typer.Argument(help="Remote name, e.g. origin.")],
    url: Annotated[str, typer.Argument(help="Any DVC remote URL or a local directory.")],
    default: Annotated[bool, typer.Option("-d", "--default", help="Make it the default remote.")] = False,
    store: StoreOption = None,
) -> None:
    """Add a remote (the first one added becomes the default)."""
    url = Repo.open(store).add_remote(name, url, default=default)
    console.print(f"Added remote {name} -> {url}", highlight=False)


@remote_app.command("list")
def remote_list(store: StoreOption = None, json_: JsonOption = False) -> None:
    """List remotes and their URLs."""
    remotes = Repo.open(store).remotes()
    if json_:
        print_json(remotes)
        return
    for name, url in remotes.items():
        console.print(f"{name:<16} {url}", highlight=False)


@remote_app.command("remove")
def remote_remove(name: Annotated[str, typer.Argument(help="Remote to forget.")], store: StoreOption = None) -> None:
    """Forget a remote (its data stays where it is)."""
    Repo.open(store).remove_remote(name)
    console.print(f"Removed remote {name}")


def _render(report, verb: str, json_: bool) -> None:
    if json_:
        print_json(asdict(report))
        return
    for ref, (old, new) in report.updated.items():
        console.print(f"  {short(old) if old else '(new)':>12} -> {short(new)}  {ref}", highlight=False)
    state = f"{len(report.updated)} ref(s) updated, {len(report.up_to_date)} up to date"
    console.print(f"{verb} {report.remote} ({report.url}): {state}, {report.objects} object(s)", highlight=False)


def push(
    name: Annotated[str | None, typer.Argument(help="Remote (default: the default remote).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Push every branch and tag, not just the current branch.")] = False,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Send the current branch (or --all) and its objects to a remote; fast-forward only."""
    _render(Repo.open(store).push(name, all_refs=all_), "pushed to", json_)


def pull(
    name: Annotated[str | None, typer.Argument(help="Remote (default: the default remote).")] = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Fetch a remote's branches and tags, verify every object, fast-forward local refs (never overwrite)."""
    _render(Repo.open(store).pull(name), "pulled from", json_)


def clone(
    url: Annotated[str, typer.Argument(help="The remote's URL (a DVC remote a store was pushed to).")],
    directory: Annotated[Path, typer.Argument(help="Where the new store goes.")],
    json_: JsonOption = False,
) -> None:
    """Make a new store from a remote: full log, every version checkable out; the remote becomes `origin`."""
    cloned = Repo.clone(url, directory)
    branch, head = cloned.head()
    if json_:
        print_json({"store": str(cloned.path), "head": head, "branch": branch, "refs": cloned.refs()})
        return
    console.print(f"Cloned into {cloned.path.parent}: {len(cloned.refs())} ref(s), on {branch} at {short(head)}",
                  highlight=False)


def export(
    rev: Annotated[str, typer.Argument(help="Version to export.")],
    out_dir: Annotated[Path, typer.Argument(help="New folder to write (must not exist or be empty).")],
    with_base: Annotated[bool, typer.Option("--with-base", help="Also copy the base model into the folder.")] = False,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Write one version as a peft-like folder that `lemoe_store.load_version(OUT_DIR)` loads."""
    from ..export import export_version

    repo = Repo.open(store)
    cid = repo.resolve(rev)
    out = export_version(repo, cid, out_dir, with_base)
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    if json_:
        print_json({"path": str(out), "commit": cid, "files": files})
        return
    console.print(f"Exported {short(cid)} to {out} ({sum(files.values()):,} bytes)", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(remote_app, name="remote", rich_help_panel="Sharing")
    for fn in (push, pull, clone, export):
        app.command(rich_help_panel="Sharing")(fn)
