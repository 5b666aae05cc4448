"""`lemoe bench lifelong|batch`: LEMoE against FT-L, GRACE, WISE, MEMOIR and a conventional MoE, side by side."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from .. import models
from ..bench import DEFAULT_METHODS, PROTOCOLS, TITLES
from ..errors import BenchError
from ..schemas.facts import load_facts
from .output import console, err_console, fmt, print_json, print_table

if TYPE_CHECKING:  # the benchmark (torch) loads only when it runs
    from ..bench import Result

bench_app = typer.Typer(help="Benchmark LEMoE against prior editors on the same model and data.",
                        no_args_is_help=True)

Methods = Annotated[str, typer.Option("--methods", help="Comma-separated ids: " + "; ".join(
    f"{name} ({title})" for name, title in TITLES.items()) + ".")]
Data = Annotated[Path, typer.Option("--data", help="ZsRE / CounterFact / native facts file.")]
Irrelevant = Annotated[Path, typer.Option(
    "--irrelevant", help="Facts whose locality prompts WISE may train on as 'irrelevant' inputs (never edited).")]
Records = Annotated[str | None, typer.Option(
    "--records", metavar="START:END", help="Only these records of --data (e.g. 500:1000, CounterFact's reporting half).")]
Model = Annotated[str, typer.Option("--model", help="Embedded model name or a local HF model directory.")]
Layer = Annotated[int, typer.Option("--layer", help="The edited layer, for every method.")]
Out = Annotated[Path, typer.Option("--out", help="Folder for results.json and results.png.")]
DEFAULT_DATA = Path("../shared/data/zsre_mend_eval.json")
DEFAULT_POOL = Path("../shared/data/zsre_mend_train-1k.json")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]
Protocol = Annotated[str, typer.Option("--protocol", help="tf (teacher-forced), wild (free generation) or both.")]
Workers = Annotated[int, typer.Option("--workers", help="Run the grid's cells at once in N local processes.")]
Ray = Annotated[str | None, typer.Option(
    "--ray", is_flag=False, flag_value="local", metavar="[ADDRESS]",
    help="Run the grid's cells on a Ray cluster (at ADDRESS; alone: a local one). Needs lemoe-store[ray].")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Keep the cells --out's results.json already holds and run the rest, long cells from their "
                     "last checkpoint (same commit, data and settings only).")]


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"--T takes comma-separated integers, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("--T needs positive sizes")
    return sizes


def _records(text: str | None) -> slice:
    if text is None:
        return slice(None)
    try:
        first, last = (int(part) if part.strip() else None for part in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"--records takes START:END (e.g. 500:1000), not {text!r}") from None
    return slice(first, last)


def _run(mode: str, methods: str, sizes: str, data: Path, records: str | None, irrelevant: Path, batch_size: int,
         model: str, layer: int, out: Path, json_: bool, protocol: str, workers: int, ray: str | None,
         resume: bool) -> None:
    from ..bench import METHODS, BenchSettings, code_version, irrelevant_pool, resumable, run_grid, save
    from ..parallel import workers_for

    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"--protocol takes one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    counts = _sizes(sizes)
    facts = load_facts(data, skipped=[])[_records(records)]
    if max(counts) > len(facts):
        raise typer.BadParameter(f"--T {max(counts)} is more than the {len(facts)} facts of {data}"
                                 + (f" [{records}]" if records else ""))
    irrelevant_facts = load_facts(irrelevant, skipped=[])
    cell_workers = workers_for(workers, ray)
    settings = BenchSettings(layer=layer)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}",
                                 param_hint="--methods")
    meta = {"mode": mode, "data": str(data), "records": records, "irrelevant": str(irrelevant), "model": model,
            "layer": layer, "batch_size": batch_size, "protocol": protocol, "commit": code_version(),
            "workers": "ray" if ray is not None else workers,
            "settings": {name: METHODS[name].hyperparameters(settings) for name in names}}
    done: list[Result] = []
    earlier_seconds = 0.0
    if resume:
        try:
            done, earlier = resumable(out, meta)
        except BenchError as error:
            raise typer.BadParameter(str(error), param_hint="--resume") from None
        meta["settings"] = {**earlier.get("settings", {}), **meta["settings"]}
        earlier_seconds = earlier.get("seconds_total", 0.0)
    kept = list(done)
    checkpoints = out / "checkpoints"  # long cells' progress (WISE, MEMOIR): only a resumed run reads it
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    base, tokenizer = models.load_model(model, device="auto")
    began = time.perf_counter()

    def started(name: str, size: int) -> None:
        err_console.print(f"[dim]{mode}: {name}, T = {size} …[/]", highlight=False)

    def finished(result: Result) -> None:  # saved as they come: a long grid stopped early keeps its rows
        done.append(result)
        save(done, out, {**meta, "seconds_total": round(earlier_seconds + time.perf_counter() - began, 1)})

    results = run_grid(mode, base, tokenizer, facts, names, counts, batch_size, settings,
                       irrelevant_pool(tokenizer, irrelevant_facts), on_start=started, on_result=finished, protocol=protocol,
                       workers=cell_workers, model_name=model, device=str(models.resolve_device("auto")),
                       done={(r.method, r.T) for r in kept}, checkpoints=checkpoints)
    results = kept + results
    meta["seconds_total"] = round(earlier_seconds + time.perf_counter() - began, 1)
    json_path, png_path = save(results, out, meta)
    if json_:
        print_json({**meta, "results": [r.__dict__ for r in results], "files": [str(json_path), str(png_path)]})
        return
    print_table(_table(results, f"{mode} editing: {data.name}, {model}, layer {layer}"))
    console.print(f"wrote {json_path} and {png_path} ({meta['seconds_total']} s)", highlight=False)


def _table(results: list[Result], title: str) -> Table:
    table = Table(title=title)
    wild = any(r.wild_rel is not None for r in results)
    ported = any(r.portability is not None for r in results)  # only data with portability questions has them
    columns = ["method", "T", "batch", "Rel", "Gen", "Loc", "mean"] + ["Port."] * ported + ["PPL (base)"]
    columns += ["WILD Rel", "WILD Gen", "WILD Loc", "WILD mean"] + ["WILD Port."] * ported if wild else []
    columns += ["fluency (base)", "degenerate (base)"] * wild + ["s/edit", "bytes/edit"]
    for column in columns:
        # The method's name wraps in a narrow terminal; the figures never do.
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column != "method")
    for r in results:
        cells = [TITLES[r.method], str(r.T), str(r.batch_size), fmt(r.rel), fmt(r.gen), fmt(r.loc), fmt(r.mean)]
        cells += [fmt(r.portability)] * ported + [f"{fmt(r.ppl, 2)} ({fmt(r.base_ppl, 2)})"]
        if wild:
            cells += [fmt(r.wild_rel), fmt(r.wild_gen), fmt(r.wild_loc), fmt(r.wild_mean)]
            cells += [fmt(r.wild_portability)] * ported + [f"{fmt(r.fluency, 2)} ({fmt(r.base_fluency, 2)})",
                                                           f"{fmt(r.degenerate, 2)} ({fmt(r.base_degenerate, 2)})"]
        table.add_row(*cells, fmt(r.s_per_edit), f"{r.bytes_per_edit:,.0f}")
    return table


@bench_app.command()
def lifelong(
    methods: Methods = ",".join(DEFAULT_METHODS),
    sizes: Annotated[str, typer.Option("--T", help="Comma-separated numbers of sequential edits.")] = "1,10,100",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Facts per edit batch.")] = 10,
    data: Data = DEFAULT_DATA, records: Records = None, irrelevant: Irrelevant = DEFAULT_POOL,
    model: Model = models.DEFAULT_MODEL,
    layer: Layer = 18, out: Out = Path("bench-results/lifelong"), json_: JsonFlag = False, protocol: Protocol = "tf",
    workers: Workers = 1, ray: Ray = None, resume: Resume = False,
) -> None:
    """Edit the first T facts batch after batch, then score all T (Rel/Gen/Loc, s and bytes per edit)."""
    _run("lifelong", methods, sizes, data, records, irrelevant, batch_size, model, layer, out, json_, protocol, workers,
         ray, resume)


@bench_app.command()
def batch(
    methods: Methods = ",".join(DEFAULT_METHODS),
    sizes: Annotated[str, typer.Option("--T", help="Comma-separated batch sizes (one batch each).")] = "10,100",
    data: Data = DEFAULT_DATA, records: Records = None, irrelevant: Irrelevant = DEFAULT_POOL,
    model: Model = models.DEFAULT_MODEL,
    layer: Layer = 18, out: Out = Path("bench-results/batch"), json_: JsonFlag = False, protocol: Protocol = "tf",
    workers: Workers = 1, ray: Ray = None, resume: Resume = False,
) -> None:
    """Edit the first T facts as one single batch, then score them."""
    _run("batch", methods, sizes, data, records, irrelevant, 0, model, layer, out, json_, protocol, workers, ray, resume)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench", rich_help_panel="Benchmark")
