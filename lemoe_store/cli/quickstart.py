"""`lemoe quickstart`: a real end-to-end run on the embedded model, in a throw-away (or given) store."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from .. import models
from ..repo import Repo
from ..schemas.facts import load_facts
from .output import console, err_console, short


def _ask(repo: Repo, prompt: str, label: str) -> str:
    answer = repo.ask(prompt, max_new_tokens=6)
    where = f"expert of commit {short(answer.commit)}" if answer.expert is not None else "base model"
    console.print(f"  {label:<22} [bold]{prompt}[/][green]{answer.text}[/]  [dim]({where})[/]", highlight=False)
    return answer.text


def quickstart(
    directory: Annotated[Path | None, typer.Option("--dir", help="Create the demo store here (default: a temp dir).")] = None,
    model: Annotated[str, typer.Option(help="Embedded model name or local HF model directory.")] = models.DEFAULT_MODEL,
) -> None:
    """Run the whole edit flow on the embedded model: init, commit, log, ask, checkout."""
    path = directory or Path(tempfile.mkdtemp(prefix="lemoe-quickstart-"))
    samples = resources.files("lemoe_store").joinpath("samples/facts.jsonl")
    console.rule("1. a store for the embedded model")
    repo = Repo.init(path, model=model, batch_size=6, progress=lambda msg: err_console.print(f"[dim]{msg}[/]"))
    info = repo.status()
    console.print(f"  store {info.store}  model {info.model}  adaptor layer {info.layer}")

    with resources.as_file(samples) as sample_path:
        facts = load_facts(sample_path)
    console.rule("2. the base model, before any edit")
    _ask(repo, "The capital of France is", "base model:")
    _ask(repo, facts[2].prompt, "base model:")

    console.rule(f"3. commit {len(facts)} facts (one frozen expert per planned batch)")
    with console.status("training experts…"):
        created = repo.commit(facts, message="quickstart sample facts")
    for cid, commit in repo.log():
        m = commit.metrics
        console.print(f"  [yellow]{short(cid)}[/] {commit.subject}: {m['facts']} facts, Rel {m['rel']:.2f} "
                      f"Gen {m['gen']:.2f} Loc {m['loc']:.2f}, trained in {m['seconds']:.1f} s", highlight=False)

    console.rule("4. ask the edited model")
    newest = repo.show("HEAD").facts[0]
    _ask(repo, newest.prompt, "at HEAD:")
    _ask(repo, "The largest planet in the solar system is", "unrelated prompt:")

    console.rule("5. checkout the previous version")
    repo.checkout("HEAD~1")
    _ask(repo, newest.prompt, f"at {short(created[0])} (HEAD~1):")
    repo.checkout("main")
    _ask(repo, newest.prompt, "back on main:")
    console.print(f"\nTry it yourself:  cd {path} && lemoe log && lemoe ask \"{newest.prompt}\"", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(quickstart)
