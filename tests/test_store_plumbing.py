"""The store alone, with no model: hand-made base-model record and manifests; refs, revisions, closures,
fsck and gc. These take well under a second each."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

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
from lemoe_store.stores.manifest import PAGE_SIZE
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
    pages = {page for cid in ids for page in store.read_commit(cid).page_ids}
    assert len(pages) == 3 and pages <= reachable  # each version's one page: [e0], [e0, e1], [e0, e1, e2]
    assert len(reachable) == 3 + 3 * 3 + 3
    (first_page,) = store.read_commit(ids[0]).page_ids
    assert store.closure({ids[0]}) == {ids[0], first_page, tree[0].expert, tree[0].anchors, tree[0].facts}


def test_versions_share_tree_pages_so_a_commit_adds_what_changed_not_the_whole_tree(store):
    """A commit that adds one expert writes one page of at most PAGE_SIZE entries and a manifest that lists
    the pages, whatever the history's length (format 1 wrote the whole tree into every commit)."""
    ids = _history(store, 2 * PAGE_SIZE + 3)
    last, before = store.read_commit(ids[-1]), store.read_commit(ids[-2])
    assert len(last.tree) == 2 * PAGE_SIZE + 3 and last.tree[:-1] == before.tree
    assert last.page_ids[:2] == before.page_ids[:2] and last.page_ids[2] != before.page_ids[2]
    full_tree_bytes = len(json.dumps([e.__dict__ for e in last.tree]))
    assert store.objects.size(ids[-1]) + store.objects.size(last.page_ids[-1]) < full_tree_bytes / 4
    page_sizes = [len(store._read_page(page)) for page in last.page_ids]
    assert page_sizes == [PAGE_SIZE, PAGE_SIZE, 3]
    # a commit read back serialises to its stored bytes, through its known page ids or from its tree
    assert last.to_bytes() == replace(last, page_ids=None).to_bytes() == store.objects.get(ids[-1])
    assert fsck(store).ok and gc(store).unreachable == []


def test_format_1_commits_with_the_tree_inline_still_read(store):
    entry = _entry(store, 0)
    legacy = {"format": 1, "kind": "edit", "parents": [], "author": "test", "time": 1.0, "message": "old store",
              "base_model": {"id": BASE["id"], "fingerprint": BASE["fingerprint"]}, "expert": entry.__dict__,
              "tree": [entry.__dict__], "planner": {}, "training": {}, "seed": 0, "metrics": {}}
    cid = store.objects.put(json.dumps(legacy, sort_keys=True).encode())
    store.move_ref(f"{HEADS}main", None, cid, "an old store's commit")
    commit = store.read_commit(cid)
    assert commit.tree == [entry] and commit.page_ids is None
    assert store.closure({cid}) == {cid, entry.expert, entry.anchors, entry.facts}
    child = store.add_commit(_commit(cid, [entry, _entry(store, 1)], "new", None), cid)  # written as format 2
    assert json.loads(store.objects.get(child))["format"] == 2 and len(store.read_commit(child).tree) == 2
    assert fsck(store).ok


def test_a_missing_or_damaged_tree_page_is_reported(store):
    ids = _history(store, 2)
    (page,) = store.read_commit(ids[-1]).page_ids
    path = store.objects.path(page)
    path.chmod(0o644)
    path.write_bytes(b'{"entries": []}')
    problems = fsck(Store(store.root)).problems  # a fresh reader: no page cached
    assert any(page[:12] in p and "corrupt" in p for p in problems)


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
