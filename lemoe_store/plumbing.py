"""Plumbing under the `Repo` porcelain: expert artifacts as blobs, commit manifests, and planned batches
trained into chained commits. Plain functions over a store (and, to train, a loaded model), the way
dulwich keeps its object and ref plumbing apart from its porcelain."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .editing.config import EditConfig
from .schemas.facts import Fact, canonical_jsonl
from .stores import Commit, CorruptObjectError, Store, TreeEntry
from .stores.refs import current_user
from .stores.tensors import pack, unpack

if TYPE_CHECKING:
    from .editing import ExpertArtifact

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
                  progress: Progress | None, on_commit: OnCommit) -> list[str]:
    """Train one expert per batch on top of `parent`'s experts (already attached to `model` by the Editor);
    write chained commits, handing each to `on_commit` as it is written; return their ids."""
    from .editing import Editor, evaluate

    editor = Editor(model, tokenizer, config, [read_artifact(store, e) for e in _tree(store, parent)])
    tree = _tree(store, parent)
    known = {f.prompt: f.target for f in parent_facts}
    created: list[str] = []
    for number, batch in enumerate(batches, start=1):
        def on_step(step: int, loss: float, number: int = number) -> None:
            if progress:
                progress({"batch": number, "batches": len(batches), "step": step, "loss": loss})

        artifact = editor.edit(batch, on_step=on_step)
        scores = evaluate(model, tokenizer, batch)
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


def _tree(store: Store, cid: str | None) -> list[TreeEntry]:
    return list(store.read_commit(cid).tree) if cid else []
