"""Plumbing under the `Repo` porcelain: expert artifacts as blobs, commit manifests, and planned batches
trained into chained commits. Plain functions over a store (and, to train, a loaded model), the way
dulwich keeps its object and ref plumbing apart from its porcelain."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .editing.config import EditConfig
from .errors import ConfigError
from .schemas.facts import Fact, canonical_jsonl
from .stores import Commit, CorruptObjectError, Store, TreeEntry
from .stores.refs import current_user
from .stores.tensors import pack, unpack

if TYPE_CHECKING:
    from .editing import ExpertArtifact
    from .parallel import LocalWorkers, RayWorkers

    Workers = LocalWorkers | RayWorkers

Progress = Callable[[dict], None]
OnCommit = Callable[[str, "str | None", Commit], None]  # (new commit id, its parent, the commit)


def artifact_to_blobs(artifact: ExpertArtifact) -> tuple[bytes, bytes]:
    """(expert blob, anchors blob): the weights with rank and training stats; the anchor keys with each
    anchor's fact, span and subject."""
    expert = pack(artifact.weights, {"rank": artifact.rank, "stats": artifact.stats})
    meta = {"facts": artifact.anchor_facts}
    if artifact.anchor_spans is not None:
        meta |= {"spans": artifact.anchor_spans, "subjects": artifact.anchor_subjects}
    anchors = pack({"keys": artifact.anchors.float()}, meta)
    return expert, anchors


def write_artifact(store: Store, artifact: ExpertArtifact, facts: list[Fact]) -> TreeEntry:
    expert_bytes, anchor_bytes = artifact_to_blobs(artifact)
    return TreeEntry(
        expert=store.objects.put(expert_bytes),
        anchors=store.objects.put(anchor_bytes),
        facts=store.objects.put(canonical_jsonl(facts)),
    )


def read_artifact(store: Store, entry: TreeEntry) -> ExpertArtifact:
    from .editing import ExpertArtifact

    try:
        weights, meta = unpack(store.objects.get(entry.expert), entry.expert)
        anchors, anchor_meta = unpack(store.objects.get(entry.anchors), entry.anchors)
    except CorruptObjectError as exc:
        users = store.commits_using({entry.expert, entry.anchors})
        raise CorruptObjectError(f"{exc}; used by commit(s) {', '.join(c[:12] for c in users)}") from None
    return ExpertArtifact(weights, anchors["keys"], list(anchor_meta["facts"]), meta.get("stats", {}),
                          anchor_meta.get("spans"), anchor_meta.get("subjects"))


def new_commit(store: Store, config: EditConfig, *, kind: str, parent: str | None, message: str,
               tree: list[TreeEntry], entry: TreeEntry | None, planner: dict, metrics: dict,
               reverts: str | None = None) -> Commit:
    return Commit(
        kind=kind,
        parents=[parent] if parent else [],
        author=current_user(),
        time=time.time(),
        message=message,
        base_model={k: store.config["base_model"][k] for k in ("id", "fingerprint")},
        expert=entry,
        tree=list(tree),
        planner=planner,
        training=config.to_dict(),
        seed=config.seed,
        metrics=metrics,
        reverts=reverts,
    )


def train_batches(store: Store, model, tokenizer, config: EditConfig, batches: list[list[Fact]], *,
                  parent: str | None, parent_facts: list[Fact], message: str, kind: str, planner: dict,
                  progress: Progress | None, on_commit: OnCommit, workers: Workers | None = None,
                  device: str = "cpu") -> list[str]:
    """Train one expert per batch on top of `parent`'s experts; write chained commits in plan order,
    handing each to `on_commit` as it is written; return their ids. With `workers`, the batches train at
    once (see `lemoe_store.parallel`); if one cannot be trained, the commits before it stay."""
    from .editing import Editor, evaluate

    tree = list(store.read_commit(parent).tree) if parent else []
    experts = [read_artifact(store, e) for e in tree]
    editor = Editor(model, tokenizer, config, experts)
    if workers is None:
        artifacts = _trained_in_turn(editor, batches, progress)
    else:
        artifacts = _trained_apart(editor, experts, batches, workers, store.config["base_model"]["id"], device)
    known = {f.prompt: f.target for f in parent_facts}
    created: list[str] = []
    for number, (batch, artifact) in enumerate(zip(batches, artifacts), start=1):
        scores = evaluate(model, tokenizer, batch)  # with every expert up to this batch's attached
        entry = write_artifact(store, artifact, batch)
        tree.append(entry)
        subject = message if len(batches) == 1 else f"{message} [{number}/{len(batches)}]"
        overwrites = sum(1 for f in batch if known.get(f.prompt, f.target) != f.target)
        known.update({f.prompt: f.target for f in batch})
        commit = new_commit(store, config, kind=kind, parent=parent, message=subject, tree=tree, entry=entry,
                            planner={**planner, "batch": number, "overwrites": overwrites},
                            metrics={**scores.to_dict(), **artifact.stats})
        cid = store.put_commit(commit)
        on_commit(cid, parent, commit)
        parent = cid
        created.append(cid)
        if progress:
            progress({"batch": number, "batches": len(batches), "commit": cid, **artifact.stats})
    return created


def _trained_in_turn(editor, batches: list[list[Fact]], progress: Progress | None) -> Iterator[ExpertArtifact]:
    for number, batch in enumerate(batches, start=1):
        def on_step(step: int, loss: float, number: int = number) -> None:
            if progress:
                progress({"batch": number, "batches": len(batches), "step": step, "loss": loss})

        yield editor.edit(batch, on_step=on_step)


def _trained_apart(editor, experts: list[ExpertArtifact], batches: list[list[Fact]], workers: Workers,
                   model_id: str, device: str) -> Iterator[ExpertArtifact]:
    """Every batch's expert trained by a worker; yielded in plan order, each attached to the editor's model
    first (so the batch is scored with it), each checked to carry exactly the anchors planned for it."""
    import torch

    from .parallel import TrainingTask, WorkerError, stand_in

    if editor.config.routing != "kv-anchor":
        raise ConfigError("training on workers needs kv-anchor routing (the paper's router learns in turn)")
    earlier = [stand_in(a) for a in experts]
    planned = [editor.stand_in(batch) for batch in batches]
    tasks = [TrainingTask(k, model_id, device, editor.config.to_dict(), earlier + planned[:k],
                          [f.to_record() for f in batch], workers.threads) for k, batch in enumerate(batches)]
    finished: dict[int, ExpertArtifact | BaseException] = {}
    results = workers.run(tasks)
    for k in range(len(batches)):
        while k not in finished:
            index, result = next(results)
            finished[index] = result
        result = finished.pop(k)
        if isinstance(result, BaseException):
            raise WorkerError(f"batch {k + 1} of {len(batches)} could not be trained ({result}); "
                              f"the {k} batch(es) before it are committed") from result
        if result.anchor_facts != planned[k].anchor_facts or not torch.allclose(result.anchors, planned[k].anchors,
                                                                               atol=1e-4):
            raise WorkerError(f"batch {k + 1} came back with other anchors than planned")
        editor.adaptor.add_expert(result)
        yield result

