"""The store: `.lemoe/` with objects, refs, config.json, index.db and cache/ (see the README's layout).

A commit is written objects-first, then made visible by one compare-and-swap of a ref: a crash at any
point leaves the old history or the new one. The SQLite index and the cache are derived and rebuilt
whenever they disagree with the refs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import sqlite_utils

from ..schemas import first_error
from . import index as idx
from .errors import AmbiguousRevisionError, BadRevisionError, NotAStoreError, RefConflictError, StoreError
from .fsutil import TEMP_PREFIX, atomic_write
from .lock import store_lock
from .manifest import Commit, TreeEntry, read_page
from .objects import ObjectStore, check_object_id
from .refs import HEADS, TAGS, RefStore, check_ref_name
from .tensors import metadata

STORE_DIR = ".lemoe"
FORMAT_VERSION = 1
_PAGES_KEPT = 1024  # tree pages held in memory (~16 KB each, parsed); past it the cache starts again
_REV = re.compile(r"^(?P<base>[^~^]+)(?P<ops>(?:[~^]\d*)*)$")


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = ObjectStore(root / "objects")
        self.refs = RefStore(root)
        self.config = self._read_config()
        self._db: sqlite_utils.Database | None = None
        self._pages: dict[str, list[TreeEntry]] = {}  # tree pages read so far (immutable, shared by versions)

    # -- creating and finding ------------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path, base_model: dict, edit: dict) -> Store:
        root = Path(path).resolve() / STORE_DIR
        if (root / "config.json").exists():
            raise StoreError(f"a store already exists at {root}")
        config = {"format_version": FORMAT_VERSION, "base_model": base_model, "edit": edit, "created": time.time()}
        problem = first_error("config", config)
        if problem:
            raise StoreError(f"invalid store config: {problem}")
        for sub in ("objects", "refs/heads", "refs/tags", "logs", "cache"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        atomic_write(root / "HEAD", f"ref: {HEADS}main\n".encode())
        atomic_write(root / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())  # last: marks done
        return cls(root)

    @classmethod
    def find(cls, start: Path | str | None = None) -> Store:
        """The store at `start` (a store dir or a dir holding .lemoe), `$LEMOE_DIR`, or found upwards."""
        if start is None and os.environ.get("LEMOE_DIR"):
            start = os.environ["LEMOE_DIR"]
        if start is not None:
            path = Path(start).resolve()
            for candidate in (path, path / STORE_DIR):
                if (candidate / "config.json").is_file():
                    return cls(candidate)
            raise NotAStoreError(f"no lemoe store at {path} (run `lemoe init`)")
        here = Path.cwd().resolve()
        for directory in (here, *here.parents):
            if (directory / STORE_DIR / "config.json").is_file():
                return cls(directory / STORE_DIR)
        raise NotAStoreError("not in a lemoe store (or any parent directory); run `lemoe init` or pass --store")

    def _read_config(self) -> dict:
        try:
            config = json.loads((self.root / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise NotAStoreError(f"{self.root}/config.json is unreadable: {exc}") from None
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{self.root} has store format {version!r}; this lemoe reads format {FORMAT_VERSION} only"
            )
        problem = first_error("config", config)
        if problem:
            raise StoreError(f"{self.root}/config.json is invalid: {problem}")
        return config

    def lock(self, on_wait: Callable[[str], None] | None = None, timeout: float = 600.0) -> AbstractContextManager:
        """The writer lock: held for a whole write operation (commit, revert, replay, gc)."""
        return store_lock(self.root / "lock", timeout=timeout, on_wait=on_wait)

    # -- commits -------------------------------------------------------------------------------------
    def read_commit(self, cid: str) -> Commit:
        return Commit.from_bytes(self.objects.get(cid), cid, self._read_page)

    def _read_page(self, oid: str) -> list[TreeEntry]:
        if oid not in self._pages:
            if len(self._pages) >= _PAGES_KEPT:
                self._pages.clear()
            self._pages[oid] = read_page(self.objects.get(oid), oid)
        return self._pages[oid]

    def head(self) -> tuple[str | None, str | None]:
        """(branch name or None when detached, HEAD commit id or None in an empty store)."""
        ref, cid = self.refs.head()
        return (ref[len(HEADS):] if ref else None), cid

    def put_commit(self, commit: Commit) -> str:
        """Store a commit object and its tree pages (invisible until a ref points at it); return its id."""
        pages = commit.pages()
        for _, page in pages:  # the pages first: a manifest never names a missing page
            self.objects.put(page)
        commit = replace(commit, page_ids=tuple(oid for oid, _ in pages))
        cid = self.objects.put(commit.to_bytes())
        self._index_commit(cid, commit)
        return cid

    def advance_head(self, cid: str, expected: str | None, message: str) -> None:
        """Move HEAD's branch (or a detached HEAD) to `cid`, only if it still points at `expected`."""
        ref, current = self.refs.head()
        if ref:
            self.refs.set_if_equals(ref, expected, cid, message)
            self.refs._log("HEAD", expected, cid, message)
        else:
            if current != expected:
                raise RefConflictError(f"HEAD moved (expected {expected}, found {current})")
            self.refs.set_head(cid, message)
        self.sync_index()  # a ref may now reach commits that came in as objects (pull, clone)

    def add_commit(self, commit: Commit, expected_head: str | None) -> str:
        """Store `commit` and make it HEAD, if HEAD is still `expected_head`."""
        cid = self.put_commit(commit)
        self.advance_head(cid, expected_head, f"{commit.kind}: {commit.subject}")
        return cid

    def walk(self, start: str) -> Iterator[tuple[str, Commit]]:
        """First-parent history from `start`, newest first."""
        cid: str | None = start
        while cid:
            commit = self.read_commit(cid)
            yield cid, commit
            cid = commit.parents[0] if commit.parents else None

    def resolve(self, rev: str) -> str:
        """A commit id from HEAD, a branch, a tag, a full or unique short id (>= 4), with ~N / ^ suffixes."""
        match = _REV.match(rev.strip()) if isinstance(rev, str) else None
        if not match:
            raise BadRevisionError(f"bad revision {str(rev)[:80]!r}")
        cid = self._resolve_base(match["base"])
        for op in re.findall(r"[~^]\d*", match["ops"]):
            count = int(op[1:]) if op[1:] else 1
            steps = count if op[0] == "~" else 1
            if op[0] == "^" and count > 1:
                raise BadRevisionError(f"{rev!r}: commits have only one parent")
            for _ in range(steps if count else 0):
                parent = self._first_parent(cid)
                if parent is None:
                    raise BadRevisionError(f"{rev!r} goes past the first commit")
                cid = parent
        return cid

    def _first_parent(self, cid: str) -> str | None:
        """From the index when it holds the commit (commits never change, so its row is right even if the
        index lags the refs), else from the commit object: HEAD~500 need not read 500 commits' trees."""
        try:
            row = self.db_raw().execute("select parent from commits where id = ?", [cid]).fetchone()
        except sqlite3.Error:
            row = None
        if row is not None:
            return row[0] or None
        parents = self.read_commit(cid).parents
        return parents[0] if parents else None

    def _resolve_base(self, base: str) -> str:
        if base in ("HEAD", "@"):
            _, cid = self.refs.head()
            if cid is None:
                raise BadRevisionError("HEAD has no commits yet")
            return cid
        for ref in (f"{HEADS}{base}", f"{TAGS}{base}"):
            try:
                cid = self.refs.commit_of(ref)
            except StoreError:
                cid = None
            if cid:
                return cid
        if re.fullmatch(r"[0-9a-f]{4,64}", base):
            matches = [m for m in self.objects.prefix_matches(base) if self._is_commit(m)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousRevisionError(f"short id {base!r} is ambiguous ({len(matches)} commits)")
        raise BadRevisionError(f"unknown revision {base!r}")

    def closure(self, starts: set[str]) -> set[str]:
        """Every commit, tree page and tree object reachable from the commits `starts` (those present)."""
        reachable: set[str] = set()
        for start in starts:
            if start in reachable or start not in self.objects:
                continue
            for cid, commit in self.walk(start):
                if cid in reachable:
                    break
                reachable.add(cid)
                reachable.update(commit.page_ids or ())
                for entry in commit.tree:
                    reachable.update((entry.expert, entry.anchors, entry.facts))
        return reachable

    def is_ancestor(self, ancestor: str, cid: str) -> bool:
        """Whether `ancestor` is `cid` or lies on its (single-parent) history."""
        return any(commit_id == ancestor for commit_id, _ in self.walk(cid))

    def commits_using(self, oids: set[str]) -> list[str]:
        """Commits reachable from any ref whose tree holds one of `oids` (oldest first)."""
        users: dict[str, float] = {}
        for start in set(self.all_refs().values()):
            for cid, commit in self.walk(start):
                if any({e.expert, e.anchors, e.facts} & oids for e in commit.tree):
                    users[cid] = commit.time
        return sorted(users, key=users.get)

    def _is_commit(self, oid: str) -> bool:
        try:
            self.read_commit(oid)
            return True
        except StoreError:
            return False

    def branches(self) -> dict[str, str]:
        return self.refs.list(HEADS)

    def tags(self) -> dict[str, str]:
        return self.refs.list(TAGS)

    def create_ref(self, prefix: str, name: str, cid: str, message: str) -> None:
        check_ref_name(name, "branch" if prefix == HEADS else "tag")
        if self.refs.read(f"{prefix}{name}") is not None:
            raise StoreError(f"{'branch' if prefix == HEADS else 'tag'} {name!r} already exists")
        self.move_ref(f"{prefix}{name}", None, cid, message)

    def move_ref(self, ref: str, old: str | None, new: str, message: str) -> None:
        """Point `ref` (full name) at `new` if it still points at `old` (None: create it)."""
        self.refs.set_if_equals(ref, old, check_object_id(new), message)
        self.sync_index()  # a ref may now reach commits that came in as objects (pull, clone)

    def delete_ref(self, prefix: str, name: str) -> str:
        check_ref_name(name, "branch" if prefix == HEADS else "tag")
        current = self.refs.commit_of(f"{prefix}{name}")
        if current is None:
            raise StoreError(f"{'branch' if prefix == HEADS else 'tag'} {name!r} not found")
        self.refs.set_if_equals(f"{prefix}{name}", current, None, "deleted")
        self.sync_index()  # a ref may now reach commits that came in as objects (pull, clone)
        return current

    def create_branch(self, name: str, cid: str) -> None:
        self.create_ref(HEADS, name, cid, f"branch: created from {cid[:12]}")

    def checkout(self, target: str, message: str) -> None:
        """Point HEAD at a branch name (attached) or at a commit id (detached)."""
        if target in self.branches():
            self.refs.set_head(f"{HEADS}{target}", message)
        else:
            self.refs.set_head(check_object_id(target), message)

    # -- the derived index ---------------------------------------------------------------------------
    def all_refs(self) -> dict[str, str]:
        refs = {f"{HEADS}{k}": v for k, v in self.branches().items()}
        refs.update({f"{TAGS}{k}": v for k, v in self.tags().items()})
        return refs

    def db_raw(self) -> sqlite_utils.Database:
        """The index as it is, without the freshness check (for writers that update it themselves).

        A damaged index.db is derived data: it is dropped and recreated empty (the refs check refills it).
        """
        if self._db is None:
            try:
                self._db = idx.open_index(self.root / "index.db")
            except sqlite3.DatabaseError:
                for damaged in self.root.glob("index.db*"):
                    damaged.unlink()
                self._db = idx.open_index(self.root / "index.db")
        return self._db

    @property
    def db(self) -> sqlite_utils.Database:
        """The SQLite index, first brought up to date with the refs (commits a writer just added)."""
        if idx.indexed_refs(self.db_raw()) != self.all_refs():
            self.sync_index()
        return self._db

    def sync_index(self) -> int:
        """Index every commit reachable from a ref that the index lacks; return how many were added."""
        db = self.db_raw()
        missing: list[str] = []
        for cid in sorted(set(self.all_refs().values())):
            for commit_id, _ in self.walk(cid):
                if commit_id in missing or db["commits"].count_where("id = ?", [commit_id]):
                    break
                missing.append(commit_id)
        # Oldest first, so an expert is recorded against the commit that introduced it.
        commits = {commit_id: self.read_commit(commit_id) for commit_id in missing}
        for commit_id in sorted(missing, key=lambda c: (commits[c].time, c)):
            self._index_commit(commit_id, commits[commit_id])
        idx.set_refs(db, self.all_refs())
        return len(missing)

    # -- cache/: derived data, safe to lose ----------------------------------------------------------------
    def get_cached(self, name: str) -> bytes | None:
        try:
            return (self.root / "cache" / name).read_bytes()
        except OSError:
            return None

    def put_cached(self, name: str, data: bytes) -> None:
        """Write cache/`name` atomically; a store that cannot be written (read-only) just keeps no copy."""
        try:
            (self.root / "cache").mkdir(exist_ok=True)
            atomic_write(self.root / "cache" / name, data)
        except OSError:
            pass

    def reindex(self) -> int:
        """Rebuild index.db (recreated if damaged) and empty cache/; return the number of commits indexed."""
        idx.clear(self.db_raw())
        shutil.rmtree(self.root / "cache", ignore_errors=True)
        (self.root / "cache").mkdir()
        return self.sync_index()

    def _index_commit(self, cid: str, commit: Commit) -> None:
        db = self.db_raw()
        facts: list[dict] = []
        expert = None
        if commit.expert is not None:
            facts = [
                {"fact_id": f["id"], "prompt": f["prompt"], "target": f["target"], "subject": f.get("subject", "")}
                for f in self.read_facts(commit.expert.facts)
            ]
            anchors_meta = self.read_blob_metadata(commit.expert.anchors)
            expert = {
                "id": commit.expert.expert,
                "anchors": commit.expert.anchors,
                "facts": commit.expert.facts,
                "bytes": self.objects.size(commit.expert.expert) + self.objects.size(commit.expert.anchors),
                "anchors_count": len(anchors_meta.get("facts", [])),
            }
        record = {
            "kind": commit.kind,
            "parent": commit.parents[0] if commit.parents else None,
            "author": commit.author,
            "time": commit.time,
            "message": commit.message,
            "facts_count": len(facts),
            "experts_active": len(commit.tree),
            "expert": commit.expert.expert if commit.expert else None,
            "metrics": dict(commit.metrics),
        }
        idx.add_commit(db, cid, record, facts, expert)

    # -- typed blobs ---------------------------------------------------------------------------------
    def read_facts(self, oid: str) -> list[dict]:
        return [json.loads(line) for line in self.objects.get(oid).decode("utf-8").splitlines() if line]

    def read_blob_metadata(self, oid: str) -> dict:
        return metadata(self.objects.get(oid), oid)

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return [p for p in self.root.rglob(f"{TEMP_PREFIX}*") if p.is_file()]
