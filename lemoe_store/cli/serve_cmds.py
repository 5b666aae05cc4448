"""Serving commands: serve (an OpenAI-compatible server) and audit (the answers it gave)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.table import Table

from ..repo import Repo
from .output import JsonOption, StoreOption, console, err_console, fmt, print_json, print_table


def serve(
    rev: Annotated[str, typer.Option(help="The version the model name `lemoe` serves (resolved per request).")] = "HEAD",
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1 needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LEMOE_API_KEY",
                                                help="Require `Authorization: Bearer KEY` on every request.")] = None,
    log_prompts: Annotated[bool, typer.Option("--log-prompts/--no-log-prompts",
                                              help="Keep prompt texts in the audit trail (else only sha256).")] = True,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="The largest max_tokens a request may ask for.")] = 512,
    store: StoreOption = None,
) -> None:
    """Serve the store over the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions).

    Request `model: "lemoe:<rev>"` (a branch, tag, commit prefix or HEAD~N). Every response names the
    version and the edit that answered in a `lemoe` object and the x-lemoe-version / x-lemoe-commit headers;
    every answer is appended to .lemoe/audit.db (see `lemoe audit`). Stops on Ctrl-C or SIGTERM.
    """
    from ..serve import serve as run_server

    repo = Repo.open(store)
    err_console.print(f"[dim]loading {repo.base_model_id} ...[/]")
    run_server(repo, host=host, port=port, api_key=api_key, rev=rev, log_prompts=log_prompts,
               max_tokens_cap=max_tokens)


def _since(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None
    return when if when.tzinfo else when.astimezone()


def audit(
    commit: Annotated[str | None, typer.Option("--commit", help="Only answers given by this commit's expert "
                                                                "(or `base`: by the base model).")] = None,
    fact: Annotated[str | None, typer.Option("--fact", help="Only answers routed to this fact id.")] = None,
    since: Annotated[str | None, typer.Option(help="Only answers from this date or time on (ISO 8601).")] = None,
    limit: Annotated[int | None, typer.Option("-n", "--limit", help="Only the last N answers.")] = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """List the answers `lemoe serve` gave: when, at which version, and which edit answered."""
    records = Repo.open(store).audit(commit=commit, fact_id=fact, since=_since(since), limit=limit)
    if json_:
        print_json([r.to_dict() for r in records])
        return
    table = Table(box=None)
    for column in ("time", "model", "version", "answered by", "fact", "sim"):
        table.add_column(column, no_wrap=True)
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", min_width=12)
    for r in records:
        when = dt.datetime.fromtimestamp(r.time).astimezone().strftime("%m-%d %H:%M:%S")
        answered = "base" if r.routed_commit == "base" else f"{r.routed_commit[:8]} #{r.expert}"
        prompt = r.prompt if r.prompt is not None else f"sha256:{r.prompt_sha256[:12]}"
        table.add_row(when, r.model, r.version[:8], answered, r.fact_id or "-", fmt(r.similarity, 2),
                      prompt.replace("\n", " "))
    print_table(table)
    console.print(f"{len(records)} answer(s)", style="dim")


def register(app: typer.Typer) -> None:
    for fn in (serve, audit):
        app.command(rich_help_panel="Serving")(fn)
