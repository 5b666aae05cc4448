"""What a version's tree costs as the history grows: tree pages (commit format 2) against the whole tree in
every manifest (format 1), on the store alone (no model: the experts are small stand-in tensors, since
only the manifests and pages are measured).

    python benchmarks/tree_pages.py --commits 1000

Builds the same history twice, one expert per commit: once as today's store writes it, once with format-1
manifests (what stores written before format 2 hold). Reports the bytes of manifests and pages (the
experts, anchors and facts objects are the same in both and left out), the time to walk the whole history
reading every commit (what `log`, `resolve` and the index sync do) and to list every object it reaches
(what `gc`, `push` and `pull` do), each in a fresh `Store` so no page is cached from the build.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from lemoe_store.stores import Commit, Store, TreeEntry
from lemoe_store.stores.refs import HEADS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_checkout import timed  # noqa: E402

BASE = {"id": "stand-in", "fingerprint": "0" * 64, "layers": 4, "hidden": 8}


def entry(store: Store, n: int) -> TreeEntry:
    expert = save({"gate.weight": np.full((2, 8), n, dtype=np.float32)})
    anchors = save({"keys": np.full((1, 8), n, dtype=np.float32)}, metadata={"facts": json.dumps([f"f{n}"])})
    facts = json.dumps({"id": f"f{n}", "prompt": f"prompt {n}", "target": f"target {n}"}).encode() + b"\n"
    return TreeEntry(store.objects.put(expert), store.objects.put(anchors), store.objects.put(facts))


def format_1(commit: Commit) -> bytes:
    data = {**commit.to_dict(), "format": 1, "tree": [asdict(e) for e in commit.tree]}
    del data["tree_pages"]
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def build(root: Path, commits: int, legacy: bool) -> tuple[Store, int]:
    """`commits` chained commits, one new expert each; returns the store and its manifest + page bytes."""
    store = Store.init(root, BASE, {"layer": 2, "key_layer": 1})
    tree: list[TreeEntry] = []
    parent, written = None, 0
    for n in range(commits):
        added = entry(store, n)
        tree = [*tree, added]
        commit = Commit(kind="edit", parents=[parent] if parent else [], author="bench", time=float(n),
                        message=f"edit {n}", base_model={k: BASE[k] for k in ("id", "fingerprint")}, expert=added,
                        tree=tree)
        if legacy:
            data = format_1(commit)
            cid = store.objects.put(data)
            written += len(data)
        else:
            new_pages = [(oid, page) for oid, page in commit.pages() if oid not in store.objects]
            cid = store.put_commit(commit)
            written += store.objects.size(cid) + sum(len(page) for _, page in new_pages)
        store.refs.set_if_equals(f"{HEADS}main", parent, cid, commit.subject)
        parent = cid
    return store, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=1000)
    args = parser.parse_args()
    print(f"{args.commits} commits, one expert each")
    print("| commit format | manifests + pages | per commit | walk every commit | reachable objects |")
    print("|---|---|---|---|---|")
    for legacy in (True, False):
        with tempfile.TemporaryDirectory(prefix="lemoe-tree-") as tmp:
            store, written = build(Path(tmp), args.commits, legacy)
            head = store.refs.commit_of(f"{HEADS}main")
            walk = timed(lambda: sum(1 for _ in Store(store.root).walk(head)))
            closure = timed(lambda: Store(store.root).closure({head}))
            name = "1 (whole tree in each manifest)" if legacy else "2 (tree pages)"
            print(f"| {name} | {written / 1e6:.1f} MB | {written / args.commits / 1e3:.1f} KB "
                  f"| {walk:.2f} s | {closure:.2f} s |")


if __name__ == "__main__":
    main()
