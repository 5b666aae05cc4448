"""fsck (verify everything) and gc (drop what no ref or reflog reaches) for a store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StoreError
from .lock import store_lock
from .store import Store
from .tensors import check


@dataclass
class FsckReport:
    objects: int = 0
    commits: int = 0
    refs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(store: Store) -> FsckReport:
    """Verify every object's hash, every ref, every manifest and every tree's objects."""
    report = FsckReport()
    for oid in store.objects.ids():
        report.objects += 1
        try:
            store.objects.get(oid)
        except StoreError as exc:
            report.problems.append(str(exc))
    starts = {}
    try:
        starts.update(store.all_refs())
        _, head = store.refs.head()
        if head:
            starts["HEAD"] = head
    except StoreError as exc:
        report.problems.append(f"refs: {exc}")
    report.refs = len(starts)
    checked: set[str] = set()
    for name, cid in sorted(starts.items()):
        try:
            for commit_id, commit in store.walk(cid):
                if commit_id in checked:
                    break
                checked.add(commit_id)
                report.problems.extend(_check_tree(store, commit_id, commit))
        except StoreError as exc:
            report.problems.append(f"{name}: {exc}")
    report.commits = len(checked)
    return report


def _check_tree(store: Store, cid: str, commit) -> list[str]:
    problems = []
    for entry in commit.tree:
        for kind, oid in (("expert", entry.expert), ("anchors", entry.anchors), ("facts", entry.facts)):
            try:
                data = store.objects.get(oid)
                if kind == "facts":
                    [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
                else:
                    check(data, oid)
            except (StoreError, ValueError) as exc:
                problems.append(f"commit {cid[:12]}: {kind} {oid[:12]}: {exc}")
    return problems


@dataclass
class GcReport:
    unreachable: list[str]
    temp_files: list[Path]
    bytes: int
    pruned: bool


def reachable_objects(store: Store) -> set[str]:
    """Objects reachable from any ref, HEAD, or any reflog entry (so recent history can be recovered)."""
    starts = set(store.all_refs().values())
    logs = store.root / "logs"
    for log in logs.rglob("*") if logs.is_dir() else []:
        if log.is_file():
            ref = log.relative_to(store.root / "logs").as_posix()
            starts.update(e["new"] for e in store.refs.reflog(ref) if set(e["new"]) != {"0"})
    _, head = store.refs.head()
    if head:
        starts.add(head)
    return store.closure(starts)


def gc(store: Store, prune: bool = False) -> GcReport:
    """List (or with prune=True, delete) unreachable objects and leftover temp files."""
    # Both locks: no commit is writing objects and no ref update has a temp file in flight.
    with store.lock(timeout=30), store_lock(store.root / "refs.lock", timeout=30):
        keep = reachable_objects(store)
        unreachable = [oid for oid in store.objects.ids() if oid not in keep]
        temps = store.temp_files()
        size = sum(store.objects.size(o) for o in unreachable) + sum(p.stat().st_size for p in temps)
        if prune:
            for oid in unreachable:
                store.objects.path(oid).unlink()
            for path in temps:
                path.unlink(missing_ok=True)
    return GcReport(unreachable, temps, size, prune)
