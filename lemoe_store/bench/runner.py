"""The side-by-side benchmark: every method edits the same facts on the same model, scored the same way.

Lifelong: for each T, a fresh copy of the method edits the first T facts batch after batch, then Rel / Gen /
Loc are measured over all T facts (EasyEdit definitions, `lemoe_store.editing.evaluate`), with seconds and
bytes added per edit. Batch: the first T facts as one single batch. Protocols: `tf` (teacher-forced),
`wild` (free generation: WILD Rel/Gen/Loc, fluency, degenerate; the teacher-forced scores come along, as
they cost little) or `both`; the base model's generations are taken once, before any method edits.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..editing.batching import Pair
from ..editing.metrics import (BaseGenerations, base_generations, evaluate, locality_pairs, locality_predictions,
                               target_perplexities)
from ..errors import BenchError
from ..schemas.facts import Fact
from . import PROTOCOLS, TITLES
from .base import BenchSettings, Method
from .ftl import FineTuneLayer
from .grace import Grace
from .lemoe import Lemoe, LemoeNoPlan, LemoePaperRouting
from .memoir import Memoir
from .moe import LearnedRouterFrozenExperts, LearnedRouterMoE
from .wise import Wise, WiseRetrieve

if TYPE_CHECKING:
    from ..parallel import LocalWorkers, RayWorkers

    Workers = LocalWorkers | RayWorkers

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (Lemoe, LemoePaperRouting, LemoeNoPlan, LearnedRouterFrozenExperts, LearnedRouterMoE, FineTuneLayer,
                Grace, Wise, WiseRetrieve, Memoir)
}


@dataclass
class Result:
    mode: str  # "lifelong" or "batch"
    method: str
    T: int
    batch_size: int
    batches: int
    rel: float
    gen: float | None
    loc: float | None
    mean: float
    seconds: float  # editing only (planning and training), not scoring
    s_per_edit: float
    bytes_per_edit: float
    portability: float | None = None  # questions that follow from the edit (ZsRE), teacher-forced
    ppl: float | None = None  # the target's perplexity after the edit prompt (long-form edits' metric)
    base_ppl: float | None = None
    wild_rel: float | None = None
    wild_gen: float | None = None
    wild_loc: float | None = None
    wild_portability: float | None = None
    wild_mean: float | None = None
    fluency: float | None = None
    base_fluency: float | None = None
    degenerate: float | None = None
    base_degenerate: float | None = None


def code_version() -> str | None:
    """The git commit of the code that runs (with "+dirty" when it has uncommitted changes), so a results
    file says which code produced it; None outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def irrelevant_pool(tokenizer, facts: list[Fact]) -> list[Pair]:
    """Locality prompts of facts that are never edited: WISE's "irrelevant" inputs for its margin loss."""
    return locality_pairs(tokenizer, facts)


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, model, tokenizer, settings: BenchSettings, irrelevant: list[Pair]) -> Method:
    cls = method_class(name)
    if issubclass(cls, (Wise, Memoir)):  # both estimate their routing from prompts that are never edited
        return cls(model, tokenizer, settings, irrelevant)
    return cls(model, tokenizer, settings)


def run_one(mode: str, name: str, model, tokenizer, facts: list[Fact], batch_size: int, settings: BenchSettings,
            irrelevant: list[Pair], base_locality: list[list[int]], base_perplexities: list[float],
            base: BaseGenerations | None = None, checkpoint: Path | None = None) -> Result:
    """One method at one T; `base` (the unedited model's generations for `facts`) turns on the WILD protocol.
    With `checkpoint`, a resumable method (WISE, MEMOIR: hours per cell here) saves what it has edited there
    every `CHECKPOINT_SECONDS`, and goes on from a checkpoint it finds; the file goes once the cell is done."""
    torch.manual_seed(settings.seed)
    method = make_method(name, model, tokenizer, settings, irrelevant)
    checkpoint = checkpoint if method.resumable else None
    try:
        began = time.perf_counter()
        batches = method.order(facts, batch_size if mode == "lifelong" else len(facts))
        seconds = time.perf_counter() - began
        done, seconds = _restore(method, checkpoint, len(facts)) if checkpoint and checkpoint.exists() else (0, seconds)
        saved_at = time.monotonic()
        for number in range(done, len(batches)):
            began = time.perf_counter()
            method.edit(batches[number])
            seconds += time.perf_counter() - began
            if checkpoint and time.monotonic() - saved_at > CHECKPOINT_SECONDS and number + 1 < len(batches):
                _save_checkpoint(method, checkpoint, len(facts), number + 1, seconds)
                saved_at = time.monotonic()
        scores = evaluate(method.model_for_eval(), tokenizer, facts, base_locality=base_locality,
                          generate=base is not None, base=base, base_perplexities=base_perplexities)
    finally:
        method.close()
    if checkpoint:
        checkpoint.unlink(missing_ok=True)
    rounded = scores.to_dict()
    wild = {k: rounded[k] for k in ("wild_rel", "wild_gen", "wild_loc", "wild_portability", "fluency", "base_fluency",
                                    "degenerate", "base_degenerate")}
    return Result(mode, name, len(facts), batch_size if mode == "lifelong" else len(facts), len(batches),
                  rounded["rel"], rounded["gen"], rounded["loc"], round(scores.mean, 4),
                  round(seconds, 2), round(seconds / len(facts), 3), round(method.bytes_added / len(facts)),
                  rounded["portability"], rounded["ppl"], rounded["base_ppl"],
                  wild_mean=None if scores.wild_mean is None else round(scores.wild_mean, 4), **wild)


CHECKPOINT_SECONDS = 600.0


def _save_checkpoint(method: Method, path: Path, size: int, batches: int, seconds: float) -> None:
    tensors, values = method.state()
    record = {"commit": code_version(), "method": method.name, "T": size, "batches": batches, "seconds": seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # a run killed while saving keeps the last whole checkpoint
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial,
              metadata={"record": json.dumps(record), "values": json.dumps(values)})
    partial.replace(path)


def _restore(method: Method, path: Path, size: int) -> tuple[int, float]:
    """Load a checkpoint into `method`; (batches done, editing seconds so far). Refuses one that another
    commit, method or T wrote, or any from code with uncommitted changes."""
    with safe_open(path, "pt") as opened:
        record, values = (json.loads(opened.metadata()[key]) for key in ("record", "values"))
        tensors = {key: opened.get_tensor(key) for key in opened.keys()}
    commit = code_version()
    if (record["method"], record["T"]) != (method.name, size) or record["commit"] != commit or commit.endswith("+dirty"):
        raise BenchError(f"{path}: a checkpoint of {record['method']} at T = {record['T']} from {record['commit']}, "
                         f"not of {method.name} at T = {size} from {commit}; delete it to start the cell over")
    method.load_state(tensors, values)
    return record["batches"], record["seconds"]


@dataclass(frozen=True)
class Cell:
    """One cell of the grid, a method at one T, with everything a worker process needs to run it."""

    index: int  # its place in the grid
    mode: str
    method: str
    facts: list[dict]  # the first T facts, as records
    batch_size: int
    settings: BenchSettings
    irrelevant: list[Pair]
    base_locality: list[list[int]]
    base_perplexities: list[float]
    base: BaseGenerations | None
    model: str = ""  # for a worker: the model's id or directory, and where it runs
    device: str = "cpu"
    threads: int = 1
    checkpoint: str = ""  # where a resumable method keeps its progress ("" : nowhere)

    @property
    def label(self) -> str:
        return f"{self.method} at T = {len(self.facts)}"


def run_cell(cell: Cell, model=None, tokenizer=None) -> Result:
    """Run one cell on `model` (the caller's), or, in a worker process, on the worker's own copy."""
    if model is None:
        from ..parallel import worker_model

        torch.set_num_threads(cell.threads)
        model, tokenizer = worker_model(cell.model, cell.device)
    facts = [Fact.from_record(record) for record in cell.facts]
    return run_one(cell.mode, cell.method, model, tokenizer, facts, cell.batch_size, cell.settings, cell.irrelevant,
                   cell.base_locality, cell.base_perplexities, cell.base, Path(cell.checkpoint) if cell.checkpoint else None)


def run_grid(mode: str, model, tokenizer, facts: list[Fact], methods: list[str], sizes: list[int], batch_size: int,
             settings: BenchSettings, irrelevant: list[Pair],
             on_start: Callable[[str, int], None] | None = None,
             on_result: Callable[[Result], None] | None = None, protocol: str = "tf",
             workers: Workers | None = None, model_name: str = "", device: str = "cpu",
             done: Collection[tuple[str, int]] = (), checkpoints: Path | None = None) -> list[Result]:
    """Every method at every T but the (method, T) cells in `done`, smallest T first: a grid stopped early
    holds every method's small cells. The base model's locality predictions (and, for the WILD protocol,
    its generations) are taken once, before any edit. With `workers` (`parallel.workers_for`), the cells
    run at once in worker processes that load `model_name` themselves; the results come back in grid order.
    With `checkpoints` (a folder), long cells of resumable methods save their progress there (`run_one`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    for name in methods:
        method_class(name)  # fail before any work on a misspelt name
    if max(sizes) > len(facts):
        raise ValueError(f"T = {max(sizes)} but the data holds {len(facts)} facts")
    todo = [(name, size) for size in sizes for name in methods if (name, size) not in done]
    if not todo:
        return []
    base_all = locality_predictions(model, tokenizer, facts[: max(sizes)])
    base_perplexities = target_perplexities(model, tokenizer, facts[: max(sizes)])
    generated = base_generations(model, tokenizer, facts[: max(sizes)]) if protocol != "tf" else None
    cells = []
    for name, size in todo:
        subset = facts[:size]
        localities = sum(len(f.locality) for f in subset)
        generations = generated and BaseGenerations(generated.locality[:localities], generated.continuations[:size])
        checkpoint = str(checkpoints / f"{name}-T{size}.safetensors") if checkpoints else ""
        cells.append(Cell(len(cells), mode, name, [f.to_record() for f in subset], batch_size, settings, irrelevant,
                          base_all[:localities], base_perplexities[:size], generations, model_name, device,
                          getattr(workers, "threads", 1), checkpoint))
    if workers is None:
        outcomes = _in_turn(cells, model, tokenizer, on_start)
    else:
        for cell in cells:  # they all start at once
            if on_start:
                on_start(cell.method, len(cell.facts))
        outcomes = workers.run(cells, run_cell)
    results: dict[int, Result] = {}
    for index, outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results[index] = outcome
        if on_result:
            on_result(outcome)
    return [results[i] for i in range(len(cells))]


def _in_turn(cells: list[Cell], model, tokenizer, on_start) -> Iterator[tuple[int, Result]]:
    for cell in cells:
        if on_start:
            on_start(cell.method, len(cell.facts))
        yield cell.index, run_cell(cell, model, tokenizer)


# What a resumed grid must share with the results it continues: everything but the timing and the rows.
_RUN_KEYS = ("mode", "data", "records", "irrelevant", "model", "layer", "batch_size", "protocol", "commit")


def resumable(out_dir: Path, meta: dict) -> tuple[list[Result], dict]:
    """The rows and the run record of `out_dir`'s results.json, for a run that continues it (none and {}
    when there is no file). Refuses (BenchError) when the two runs differ in anything that shapes a figure:
    the code's commit, the data, the model, the protocol or a method's settings, so one results file never
    mixes runs."""
    path = out_dir / "results.json"
    if not path.exists():
        return [], {}
    commit = meta.get("commit")
    if commit is None or commit.endswith("+dirty"):
        raise BenchError(f"cannot resume from code with uncommitted changes ({commit or 'not a git checkout'}): "
                         "commit them first")
    try:
        saved = json.loads(path.read_text())
        rows = [Result(**{k: v for k, v in row.items() if k != "title"}) for row in saved["results"]]
    except (ValueError, KeyError, TypeError) as error:
        raise BenchError(f"{path}: not a benchmark results file ({error})") from None
    for key in _RUN_KEYS:
        if saved.get(key) != meta.get(key):
            raise BenchError(f"{path} was made with {key} = {saved.get(key)!r}, this run has {meta.get(key)!r}")
    for name, settings in meta.get("settings", {}).items():
        earlier = saved.get("settings", {}).get(name)
        if earlier is not None and earlier != settings:
            raise BenchError(f"{path} ran {name} with other settings: {earlier} (now {settings})")
    saved.pop("results")
    return rows, saved


def save(results: list[Result], out_dir: Path, meta: dict) -> tuple[Path, Path]:
    """results.json (with the run's settings) and a PNG of Rel / Gen / Loc against T per method."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    rows = [{"title": TITLES[r.method], **asdict(r)} for r in results]
    partial = json_path.with_suffix(".json.partial")  # a run killed while saving leaves the last whole file
    partial.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    partial.replace(json_path)
    png_path = out_dir / "results.png"
    plot(results, png_path, title=f"{meta.get('mode', '')} editing, {meta.get('data', '')}")
    return json_path, png_path


def plot(results: list[Result], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"rel": "Rel", "gen": "Gen", "loc": "Loc"}
    if any(r.wild_rel is not None for r in results):
        titles |= {"wild_rel": "WILD Rel", "wild_gen": "WILD Gen", "wild_loc": "WILD Loc"}
    figure, axes = plt.subplots(len(titles) // 3, 3, figsize=(13, 4 * len(titles) // 3), sharey=True, squeeze=False)
    for axis, (metric, metric_title) in zip(axes.ravel(), titles.items()):
        for method in dict.fromkeys(r.method for r in results):
            ordered = sorted((r for r in results if r.method == method), key=lambda r: r.T)
            points = [(r.T, getattr(r, metric)) for r in ordered if getattr(r, metric) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=TITLES[method])
        axis.set_xscale("log")
        axis.set_xlabel("T (edits)")
        axis.set_title(metric_title)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
