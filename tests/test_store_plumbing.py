"""The store alone, with no model: hand-made base-model record and manifests; refs, revisions, closures,
fsck and gc. These take well under a second each."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from safetensors.numpy import save

from lemoe_store.stores import (
    AmbiguousRevisionError,
    BadRevisionError,
    Commit,
    RefConflictError,
    Store,
    StoreError,
    TreeEntry,
)
from lemoe_store.stores.maintenance import fsck, gc
from lemoe_store.stores.objects import object_id
from lemoe_store.stores.refs import HEADS

BASE = {"id": "hand-made", "fingerprint": "0" * 64, "layers": 4, "hidden": 8}


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.init(tmp_path, BASE, {"layer": 2, "key_layer": 1})


def _entry(store: Store, n: int) -> TreeEntry:
    expert = save({"gate.weight": np.full((2, 8), n, dtype=np.float32)}, metadata={"rank": "2"})
    anchors = save({"keys": np.eye(1, 8, dtype=np.float32)}, metadata={"facts": json.dumps([f"f{n}"])})
    facts = json.dumps({"id": f"f{n}", "prompt": f"prompt {n}", "target": f"target {n}"}).encode() + b"\n"
    return TreeEntry(store.objects.put(expert), store.objects.put(anchors), store.objects.put(facts))


def _commit(parent: str | None, tree: list[TreeEntry], message: str, entry: TreeEntry | None = None) -> Commit:
    return Commit(kind="edit", parents=[parent] if parent else [], author="test", time=1.0, message=message,
                  base_model={"id": BASE["id"], "fingerprint": BASE["fingerprint"]}, expert=entry, tree=tree)


def _history(store: Store, length: int) -> list[str]:
    """`length` chained commits on main, each adding one expert; ids oldest first."""
    ids, tree, parent = [], [], None
    for n in range(length):
        entry = _entry(store, n)
        tree = [*tree, entry]
        parent = store.add_commit(_commit(parent, tree, f"edit {n}", entry), parent)
        ids.append(parent)
    return ids


def test_revisions_resolve_like_git(store):
    first, second, third = _history(store, 3)
    assert store.resolve("HEAD") == store.resolve("main") == store.resolve("@") == third
    assert store.resolve("HEAD~2") == store.resolve("HEAD^^") == store.resolve("main~1^") == first
    assert store.resolve(third[:4]) == third and store.resolve("HEAD~0") == third
    store.create_ref("refs/tags/", "v1", second, "tag")
    assert store.resolve("v1~1") == first
    for bad, words in [("HEAD~3", "past the first commit"), ("HEAD^2", "one parent"), ("nosuch", "unknown"),
                       ("abc", "unknown"), ("HEAD~x", "bad revision")]:
        with pytest.raises(BadRevisionError, match=words):
            store.resolve(bad)


def test_an_ambiguous_short_id_is_refused(store):
    messages, seen = {}, {}
    for n in range(5000):  # two commits whose ids share their first four hex digits
        commit = _commit(None, [], f"probe {n}")
        prefix = object_id(commit.to_bytes())[:4]
        if prefix in seen:
            messages = [seen[prefix], commit]
            break
        seen[prefix] = commit
    ids = [store.put_commit(c) for c in messages]
    assert ids[0][:4] == ids[1][:4] and ids[0] != ids[1]
    with pytest.raises(AmbiguousRevisionError, match="ambiguous"):
        store.resolve(ids[0][:4])
    assert store.resolve(ids[0][:12]) == ids[0]


def test_ref_updates_are_compare_and_swap(store):
    first, second = _history(store, 2)
    with pytest.raises(RefConflictError):
        store.move_ref(f"{HEADS}main", first, first, "stale: main is at second")
    assert store.resolve("main") == second
    store.create_branch("topic", first)
    with pytest.raises(StoreError, match="already exists"):
        store.create_branch("topic", second)
    results = []

    def move(target: str) -> None:  # each writer opens the store itself, as separate processes would
        try:
            Store(store.root).move_ref(f"{HEADS}topic", first, target, "race")
            results.append(target)
        except RefConflictError:
            results.append(None)

    threads = [threading.Thread(target=move, args=(second,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(second) == 1 and results.count(None) == 7  # exactly one writer wins
    for bad in ("../escape", "a..b", "-x", "with space", "HEAD"):
        with pytest.raises(StoreError):
            store.create_branch(bad, first)


def test_closure_reaches_every_commit_and_object_once(store):
    ids = _history(store, 3)
    reachable = store.closure({ids[-1]})
    tree = store.read_commit(ids[-1]).tree
    assert set(ids) <= reachable
    assert {oid for e in tree for oid in (e.expert, e.anchors, e.facts)} <= reachable
    assert len(reachable) == 3 + 3 * 3
    assert store.closure({ids[0]}) == {ids[0], tree[0].expert, tree[0].anchors, tree[0].facts}


def test_fsck_finds_corruption_and_gc_keeps_what_reflogs_reach(store):
    ids = _history(store, 2)
    assert fsck(store).ok
    orphan = store.objects.put(b"nobody points here")
    report = gc(store)
    assert report.unreachable == [orphan] and not report.pruned
    gc(store, prune=True)
    assert orphan not in store.objects and ids[0] in store.objects
    store.move_ref(f"{HEADS}main", ids[1], ids[0], "reset")  # ids[1] is now reachable from the reflog only
    assert gc(store).unreachable == []
    expert = store.read_commit(ids[0]).tree[0].expert
    path = store.objects.path(expert)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-4])  # a truncated tensor blob
    problems = fsck(store).problems
    assert problems and any(expert[:12] in p for p in problems)


def test_settings_saved_by_older_versions_still_load():
    from lemoe_store.editing.config import AdaptorConfig, EditConfig

    old = {"layer": 18, "rank": 64, "threshold": 0.8, "lr": 0.03, "device": "auto", "dtype": "float32"}
    config = EditConfig.from_dict(old)
    assert (config.layer, config.key_layer, config.lr) == (18, 18, 0.03)  # keys were taken at the adaptor's layer
    assert config.adaptor() == AdaptorConfig.from_dict(old) and not hasattr(config.adaptor(), "lr")
