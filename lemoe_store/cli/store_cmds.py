"""Store commands: init, commit, log, show, status, checkout, ask, eval, reindex."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .. import models
from ..editing.config import PLANS
from ..repo import Repo
from ..schemas.facts import FORMATS, load_facts
from .output import (JsonOption, RayOption, StoreOption, WorkersOption, console, err_console, fmt, print_json,
                     print_table, short)


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _scores_row(metrics: dict) -> str:
    return " ".join(f"{k.capitalize()} {fmt(metrics.get(k))}" for k in ("rel", "gen", "loc") if metrics.get(k) is not None)


def init(
    path: Annotated[Path, typer.Argument(help="Directory to create the store in (.lemoe inside).")] = Path("."),
    model: Annotated[str, typer.Option(help="Embedded model name or a local HF model directory.")] = models.DEFAULT_MODEL,
    layer: Annotated[int | None, typer.Option(help="Decoder layer for the adaptor (default: ~60% depth).")] = None,
    key_layer: Annotated[int | None, typer.Option(help="Decoder layer whose MLP input gives the routing keys "
                                                   "(default: ~20% depth).")] = None,
    threshold: Annotated[float, typer.Option(help="Routing threshold tau (cosine similarity) for facts "
                                                  "without a subject.")] = 0.8,
    subject_threshold: Annotated[float, typer.Option(help="Routing threshold for facts with a subject (only "
                                                          "prompts naming that subject can match).")] = 0.6,
    rank: Annotated[int, typer.Option(help="Hidden width of each expert.")] = 64,
    expert_dtype: Annotated[str, typer.Option(help="Precision experts are stored in: float16, bfloat16 or "
                                                   "float32.")] = "float16",
    json_: JsonOption = False,
) -> None:
    """Create an empty store for a base model; records its fingerprint."""
    repo = Repo.init(path, model=model, layer=layer, key_layer=key_layer, threshold=threshold,
                     subject_threshold=subject_threshold, rank=rank, expert_dtype=expert_dtype,
                     progress=lambda msg: err_console.print(f"[dim]{msg}[/]"))
    info = repo.status()
    if json_:
        print_json(info.to_dict())
    else:
        console.print(f"Initialized empty lemoe store in [bold]{info.store}[/] "
                      f"(model {info.model}, layer {info.layer}, fingerprint {info.fingerprint[:12]})")


def commit(
    facts: Annotated[list[Path], typer.Argument(help="Facts files: native JSONL, ZsRE or CounterFact JSON.")],
    message: Annotated[str, typer.Option("-m", "--message", help="Commit message.")] = "",
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Facts per expert (default 10).")] = None,
    plan: Annotated[str | None, typer.Option("--plan", help=f"Ordering: {', '.join(PLANS)}.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for planning and training.")] = None,
    fmt_: Annotated[str, typer.Option("--format", help=f"Input format: {', '.join(FORMATS)}.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only validate and print the plan.")] = False,
    workers: WorkersOption = 1,
    ray: RayOption = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Train one frozen expert per planned batch; write one commit per batch."""
    loaded = [fact for path in facts for fact in load_facts(path, fmt_)]  # validate everything first
    repo = Repo.open(store)
    if dry_run:
        planned = repo.plan_commit(loaded, batch_size=batch_size, plan=plan, seed=seed)
        if json_:
            print_json({"batches": [[f.to_record() for f in b] for b in planned.batches],
                        "duplicates": len(planned.duplicates), "overwrites": planned.overwrites})
            return
        for number, batch in enumerate(planned.batches, start=1):
            console.print(f"[bold]batch {number}/{len(planned.batches)}[/] ({len(batch)} facts)")
            for fact in batch:
                console.print(f"  {fact.prompt} -> {fact.target}", highlight=False)
        _report_input(planned)
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
        disable=json_ or not err_console.is_terminal,  # piped: no bar (rich would leave a blank line)
    ) as bar:
        task = bar.add_task("planning", total=None)

        def progress(event: dict) -> None:
            bar.update(task, total=event["batches"])
            if "commit" in event:
                bar.update(task, completed=event["batch"])
            else:
                bar.update(task, description=f"batch {event['batch']}/{event['batches']} "
                                             f"step {event['step']} loss {event['loss']:.3f}")

        created = repo.commit(loaded, message=message, batch_size=batch_size, plan=plan, seed=seed, progress=progress,
                              on_wait=lambda msg: err_console.print(msg), on_plan=_report_input, workers=workers,
                              ray=ray)
    rows = [(cid, repo.get_commit(cid)) for cid in created]
    if json_:
        print_json([{"id": cid, "message": c.message, "metrics": c.metrics} for cid, c in rows])
        return
    for cid, c in rows:
        console.print(f"[yellow]{short(cid)}[/] {c.message}  ({c.metrics.get('facts')} facts, "
                      f"{_scores_row(c.metrics)}, {c.metrics.get('seconds')} s)", highlight=False)


def _report_input(planned) -> None:
    if planned.duplicates:
        err_console.print(f"{len(planned.duplicates)} duplicate fact(s) skipped")
    for prompt in planned.overwrites:
        err_console.print(f"overwrites an earlier edit: {prompt!r}", highlight=False)


def log(
    rev: Annotated[str | None, typer.Argument(help="Start from this revision (default HEAD).")] = None,
    n: Annotated[int | None, typer.Option("-n", help="Show at most N commits.")] = None,
    oneline: Annotated[bool, typer.Option("--oneline", help="One line per commit.")] = False,
    grep: Annotated[str | None, typer.Option("--grep", help="Only commits whose message or facts match.")] = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Show the commit history, newest first."""
    repo = Repo.open(store)
    entries = repo.log(rev, limit=n, grep=grep)
    if json_:
        print_json([{"id": cid, **c.to_dict(), "experts_active": len(c.tree)} for cid, c in entries])
        return
    if not entries:
        console.print("no commits yet")
        return
    for cid, c in entries:
        facts = c.metrics.get("facts", 0)
        if oneline:
            console.print(f"[yellow]{short(cid)}[/] {c.subject} ({facts} facts)", highlight=False)
            continue
        console.print(f"[yellow]commit {cid}[/] ({c.kind})")
        console.print(f"Author: {c.author}\nDate:   {_when(c.time)}", highlight=False)
        console.print(f"Experts: {len(c.tree)} active, facts in this commit: {facts}; {_scores_row(c.metrics)}")
        if c.planner.get("overwrites"):
            console.print(f"Overwrites: {c.planner['overwrites']} earlier fact(s) get a new target")
        console.print(f"\n    {c.message}\n", highlight=False)


def show(
    rev: Annotated[str, typer.Argument(help="Revision to show.")] = "HEAD",
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Show one commit: manifest, facts, metrics, expert size."""
    info = Repo.open(store).show(rev)
    if json_:
        print_json(info.to_dict())
        return
    commit = info.commit
    console.print(f"[yellow]commit {info.id}[/] ({commit.kind})")
    console.print(f"Author: {commit.author}\nDate:   {_when(commit.time)}\n\n    {commit.message}\n", highlight=False)
    metrics = commit.metrics
    console.print(f"Metrics: {_scores_row(metrics)}; training {metrics.get('seconds', '-')} s, "
                  f"{metrics.get('steps', '-')} steps")
    if commit.expert:
        console.print(f"Expert {short(commit.expert.expert)}: {info.expert_bytes} bytes; "
                      f"anchors {short(commit.expert.anchors)}: {info.anchors_bytes} bytes")
    console.print(f"Tree: {len(commit.tree)} active experts")
    table = Table("id", "prompt", "target")
    for fact in info.facts:
        table.add_row(fact.id, fact.prompt, fact.target)
    if table.row_count:
        print_table(table)


def status(store: StoreOption = None, json_: JsonOption = False) -> None:
    """Store path, model, HEAD/branch, active experts, size on disk."""
    info = Repo.open(store).status()
    if json_:
        print_json(info.to_dict())
        return
    where = f"On branch {info.branch}" if info.branch else f"HEAD detached at {short(info.head)}"
    console.print(where)
    console.print(f"store:   {info.store}\nmodel:   {info.model} (fingerprint {info.fingerprint[:12]}, "
                  f"layer {info.layer})\nHEAD:    {info.head or '(no commits yet)'}\n"
                  f"experts: {info.experts_active} active, {info.facts_active} facts\n"
                  f"size:    {info.bytes_on_disk:,} bytes on disk", highlight=False)


def checkout(
    rev: Annotated[str | None, typer.Argument(help="Branch, tag, commit id, HEAD~N ...")] = None,
    branch: Annotated[str | None, typer.Option("-b", help="Create this branch at REV and switch to it.")] = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Move HEAD to another version; later ask/eval/blame use it."""
    repo = Repo.open(store)
    if rev is None and branch is None:
        raise typer.BadParameter("give a revision or -b BRANCH")
    cid = repo.checkout(rev or "HEAD", new_branch=branch)
    name, _ = repo.head()
    if json_:
        print_json({"head": cid, "branch": name})
    elif name:
        console.print(f"Switched to {'a new ' if branch else ''}branch '{name}' at {short(cid)}")
    else:
        console.print(f"HEAD is now at {short(cid)} {repo.get_commit(cid).subject} (detached)", highlight=False)


def ask(
    prompt: Annotated[str, typer.Argument(help="The prompt to complete.")],
    rev: Annotated[str | None, typer.Option("--rev", help="Version to ask (default HEAD).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 16,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Greedy answer at a version, and which commit's expert (if any) answered."""
    answer = Repo.open(store).ask(prompt, rev=rev, max_new_tokens=max_new_tokens)
    if json_:
        print_json(answer.to_dict())
        return
    console.print(f"[bold]{answer.prompt}[/]{answer.text}", highlight=False)
    if answer.expert is not None:
        console.print(f"[dim]routed to expert {answer.expert} of commit {short(answer.commit)} "
                      f"(fact {answer.fact_id}, similarity {answer.similarity:.3f})[/]")
    elif answer.fact_id is None:
        console.print("[dim]base model answers (no experts)[/]")
    elif answer.threshold is None:
        console.print(f"[dim]base model answers (nearest anchor, fact {answer.fact_id} at similarity "
                      f"{answer.similarity:.3f}, names a subject this prompt does not contain)[/]")
    else:
        console.print(f"[dim]base model answers (best similarity {answer.similarity:.3f} < {answer.threshold})[/]")


def eval_(
    facts: Annotated[Path | None, typer.Argument(help="Facts file (default: every fact of the version).")] = None,
    rev: Annotated[str | None, typer.Option("--rev", help="Version to evaluate (default HEAD).")] = None,
    fmt_: Annotated[str, typer.Option("--format", help=f"Input format: {', '.join(FORMATS)}.")] = "auto",
    generate: Annotated[bool, typer.Option("--generate", help="Also free generation: WILD Rel/Gen/Loc, fluency.")] = False,
    samples: Annotated[int, typer.Option("--samples", help="With --generate: print this many answers of each kind.")] = 0,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Rel/Gen/Loc (EasyEdit definitions) and routing accuracy at a version; --generate adds free generation.

    Free generation (WILD): greedy answers cut at EOS, a newline or the first sentence end. WILD Rel/Gen:
    the answer starts with the target; WILD Loc: a locality answer equals the base model's; fluency: the
    generation entropy of 48-token continuations of the edit prompts (base model's beside it); degenerate:
    share of continuations that loop.
    """
    loaded = load_facts(facts, fmt_) if facts else None
    scores = Repo.open(store).evaluate(loaded, rev=rev, generate=generate)
    if json_:
        print_json({**scores.to_dict(), **({"samples": scores.samples} if samples else {})})
        return
    ported = scores.portability is not None  # only facts with portability questions have it
    table = Table("facts", "Rel", "Gen", "Loc", *["Port."] * ported, "PPL (base)", "routed: edit", "rephrase",
                  "locality→none")
    table.add_row(str(scores.facts), *(fmt(v) for v in (scores.rel, scores.gen, scores.loc)),
                  *[fmt(scores.portability)] * ported, f"{fmt(scores.ppl, 2)} ({fmt(scores.base_ppl, 2)})",
                  *(fmt(v) for v in (scores.routing_edit, scores.routing_rephrase, scores.routing_locality)))
    print_table(table)
    if generate:
        wild = Table("WILD Rel", "WILD Gen", "WILD Loc", *["WILD Port."] * ported, "fluency (base)",
                     "degenerate (base)")
        wild.add_row(fmt(scores.wild_rel), fmt(scores.wild_gen), fmt(scores.wild_loc),
                     *[fmt(scores.wild_portability)] * ported,
                     f"{fmt(scores.fluency)} ({fmt(scores.base_fluency)})",
                     f"{fmt(scores.degenerate)} ({fmt(scores.base_degenerate)})")
        print_table(wild)
        _print_samples(scores.samples, samples)


def _print_samples(samples: list[dict], per_kind: int) -> None:
    """A few generated answers of each kind, as they came out, with the base model's where it matters."""
    def one_line(text: str) -> str:  # a continuation's newlines shown, not obeyed
        return text.replace("\n", "\\n")

    for kind in ("edit", "rephrase", "locality", "portability"):
        for sample in [s for s in samples if s["kind"] == kind][:per_kind]:
            console.print(f"[dim]{kind:>8}[/] [bold]{sample['prompt']}[/]{sample['answer']}", highlight=False)
            if kind == "edit":
                console.print(f"[dim]{'':>8} continues:[/]{one_line(sample['continuation'])}", highlight=False)
            if kind == "locality":
                console.print(f"[dim]{'':>8} base:[/]{sample['base_answer']}", highlight=False)


def reindex(store: StoreOption = None, json_: JsonOption = False) -> None:
    """Rebuild index.db and cache/ from objects and refs."""
    count = Repo.open(store).reindex()
    if json_:
        print_json({"commits": count})
    else:
        console.print(f"reindexed {count} commits")


def register(app: typer.Typer) -> None:
    for fn in (init, commit, log, show, status, checkout, ask):
        app.command(rich_help_panel="Store")(fn)
    app.command("eval", rich_help_panel="Store")(eval_)
    app.command(rich_help_panel="Maintenance")(reindex)
