"""Training the batches of one commit at once: local worker processes, or tasks on a Ray cluster.

Why batches can train apart: routing keys come from a layer at or below the adaptor's, so every anchor of
a commit is known before any expert trains; and training an expert never runs the experts before it (its
own rows are forced to it, every other row to none), so batch k needs the *anchors* of the experts before
it, not their weights. The parent computes all anchors up front, each task trains one expert against
stand-ins that carry those anchors, and the parent checks each result and writes the commits in plan order.

A task whose worker dies is run once more; a task that fails twice ends the commit after the batches
before it, which stay committed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING

from .errors import ConfigError, LemoeError

if TYPE_CHECKING:
    from .editing import ExpertArtifact

ATTEMPTS = 2  # a task whose worker dies is run once more


class WorkerError(LemoeError):
    """A batch could not be trained by any worker (twice); the batches before it were committed."""


@dataclass(frozen=True)
class TrainingTask:
    """Everything one worker needs to train the expert of one batch (picklable; no model inside)."""

    index: int  # the batch's place in the plan
    model: str  # the base model's id or directory; each worker loads it once
    device: str
    config: dict  # EditConfig.to_dict()
    earlier: list[ExpertArtifact]  # stand-ins for every expert before this one: anchors, shapes, zero weights
    facts: list[dict]  # the batch, as records
    threads: int  # torch threads for this task

    @property
    def label(self) -> str:
        return f"batch {self.index + 1}"


def train_task(task: TrainingTask) -> ExpertArtifact:
    """Train one batch's expert in this process (the function local workers and Ray tasks run)."""
    import torch

    from .editing import EditConfig, Editor
    from .schemas.facts import Fact

    if os.environ.get("LEMOE_TEST_KILL_BATCH") == str(task.index):  # tests: a worker dying mid-task
        os._exit(1)
    torch.set_num_threads(task.threads)
    model, tokenizer = worker_model(task.model, task.device)
    editor = Editor(model, tokenizer, EditConfig.from_dict(task.config), task.earlier)
    return editor.edit([Fact.from_record(r) for r in task.facts])


_LOADED: dict[tuple[str, str], tuple] = {}  # per worker process: the base model, loaded once


def worker_model(model: str, device: str):
    """The base model in this worker process, loaded on first use."""
    from . import models

    if (model, device) not in _LOADED:
        _LOADED[(model, device)] = models.load_model(model, device=device)
    return _LOADED[(model, device)]


def stand_in(artifact: ExpertArtifact) -> ExpertArtifact:
    """An expert with the artifact's anchors and shape but zero weights: training never runs it."""
    from dataclasses import replace

    import torch

    return replace(artifact, weights={k: torch.zeros_like(v) for k, v in artifact.weights.items()})


def workers_for(workers: int = 1, ray: str | None = None) -> LocalWorkers | RayWorkers | None:
    """Where independent tasks (a commit's batches, a benchmark's cells) run: None (in turn, here),
    `workers` local processes, or Ray (`ray`: "" or "local" starts a local cluster, else its address)."""
    if ray is not None:
        return RayWorkers(None if ray in ("", "local") else ray, workers if workers > 1 else None)
    return LocalWorkers(workers) if workers > 1 else None


class LocalWorkers:
    """`workers` local processes (spawned, so they share nothing with the parent), the cores split evenly."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ConfigError("--workers must be at least 1")
        self.workers = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)

    def run(self, tasks: list, function: Callable = train_task) -> Iterator[tuple[int, object]]:
        """(task index, `function(task)` or its error), in completion order; tasks carry `index` and `label`
        (training tasks by default; the benchmark's cells too). All tasks share one pool; if a worker dies,
        the pool is gone, so every unfinished task is run once more, each in a process of its own (so a
        task that kills its worker again takes no other task with it)."""
        unfinished: list = []
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(function, task): task for task in tasks}
            for future in as_completed(futures):
                error = future.exception()
                if isinstance(error, BrokenProcessPool):
                    unfinished.append(futures[future])
                else:
                    yield futures[future].index, error or future.result()
        if unfinished:
            with ThreadPoolExecutor(self.workers) as runners:
                retried = {runners.submit(_alone, function, task): task for task in unfinished}
                for future in as_completed(retried):
                    yield retried[future].index, future.result()


def _alone(function: Callable, task) -> object:
    """Run one task in a process of its own; its error (a dead worker: WorkerError) instead of raising."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        future = pool.submit(function, task)
        error = future.exception()
        if isinstance(error, BrokenProcessPool):
            return WorkerError(f"the worker running {task.label} died twice")
        return error or future.result()


class RayWorkers:
    """Tasks on a Ray cluster: the one at `address`, or a local one started for this commit."""

    def __init__(self, address: str | None, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray: pip install 'lemoe-store[ray]'") from None
        self.ray = ray
        self.options = {"address": address} if address else {"num_cpus": workers or os.cpu_count()}
        self.threads = 1

    def run(self, tasks: list, function: Callable = train_task) -> Iterator[tuple[int, object]]:
        """As `LocalWorkers.run`, each task a Ray task. Connects first (unless this process already is);
        a connection made here is closed at the end, so a local cluster started for it stops with it."""
        connected_here = not self.ray.is_initialized()
        if connected_here:
            try:
                self.ray.init(**self.options, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = self.options.get("address", "a local cluster")
                raise ConfigError(f"cannot start Ray ({where}): {str(error).splitlines()[0]}") from None
        try:
            remote = self.ray.remote(num_cpus=1, max_retries=ATTEMPTS - 1)(function)  # retried if a worker dies
            refs = {remote.remote(task): task for task in tasks}
            while refs:
                done, _ = self.ray.wait(list(refs), num_returns=1)
                for ref in done:
                    task = refs.pop(ref)
                    try:
                        yield task.index, self.ray.get(ref)
                    except self.ray.exceptions.RayError as error:
                        yield task.index, WorkerError(f"{task.label} failed on Ray: {str(error).splitlines()[0]}")
        finally:
            if connected_here:
                self.ray.shutdown()
