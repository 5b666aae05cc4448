"""Commit manifests and their tree pages: canonical JSON, validated against `schemas/commit.schema.json`
and `schemas/tree_page.schema.json`.

A version's tree (every active expert) is stored as pages of up to `PAGE_SIZE` entries, each page its own
object, and the commit lists the pages' ids. A commit that adds one expert rewrites only the last page, so
consecutive versions share every other page, as git's trees share unchanged subtrees: a history's objects
grow with its experts, not with its experts squared (format 1 put the whole tree in every commit; such
commits still read).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from ..schemas import first_error
from .errors import CorruptObjectError
from .objects import object_id

FORMAT = 2
PAGE_SIZE = 32  # entries per page a writer makes (readers take any): ~7 KB; a 1,000-expert tree has 32 pages


@dataclass(frozen=True)
class TreeEntry:
    """One active expert of a version: its weights, its anchor keys and the facts it was trained on."""

    expert: str
    anchors: str
    facts: str


@dataclass(frozen=True)
class Commit:
    kind: str  # edit | revert | replay
    parents: list[str]
    author: str
    time: float
    message: str
    base_model: dict
    expert: TreeEntry | None
    tree: list[TreeEntry]
    planner: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    seed: int = 0
    metrics: dict = field(default_factory=dict)
    reverts: str | None = None
    # The ids of the tree's pages, once read or written (None: not yet known); not serialised. A commit
    # with another tree must drop them: `dataclasses.replace(c, tree=..., page_ids=None)`.
    page_ids: tuple[str, ...] | None = field(default=None, compare=False)

    def pages(self) -> list[tuple[str, bytes]]:
        """The tree's pages as objects: (id, bytes), in tree order."""
        pages = []
        for start in range(0, len(self.tree), PAGE_SIZE):
            page = {"entries": [asdict(e) for e in self.tree[start : start + PAGE_SIZE]]}
            data = _canonical(page)
            pages.append((object_id(data), data))
        return pages

    def to_dict(self) -> dict:
        """The manifest as JSON values; the tree goes by its pages' ids (`page_ids` when known)."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("tree", "page_ids")}
        data["expert"] = asdict(self.expert) if self.expert else None
        data["format"] = FORMAT
        data["tree_pages"] = list(self.page_ids) if self.page_ids is not None else [oid for oid, _ in self.pages()]
        if self.reverts is None:
            del data["reverts"]
        return data

    def to_bytes(self) -> bytes:
        """The manifest; its pages (`pages()`) are separate objects, stored before it."""
        data = self.to_dict()
        problem = first_error("commit", data)
        if problem:
            raise ValueError(f"invalid commit manifest: {problem}")
        return _canonical(data)

    @classmethod
    def from_bytes(cls, data: bytes, oid: str = "?", page: Callable[[str], list[TreeEntry]] | None = None) -> Commit:
        """The commit stored as `data`; `page` reads a tree page by id (`read_page`), for format 2."""
        raw = _parse(data, oid, "commit manifest")
        problem = first_error("commit", raw)
        if problem:
            raise CorruptObjectError(f"object {oid} is not a valid commit manifest: {problem}")
        version = raw.pop("format")
        raw["expert"] = TreeEntry(**raw["expert"]) if raw["expert"] else None
        if version == 1:
            raw["tree"] = [TreeEntry(**e) for e in raw["tree"]]
        elif page is None:
            raise ValueError("a format-2 commit needs its tree pages read: pass `page`")
        else:
            raw["page_ids"] = tuple(raw.pop("tree_pages"))
            raw["tree"] = [entry for page_id in raw["page_ids"] for entry in page(page_id)]
        return cls(**raw)

    @property
    def subject(self) -> str:
        return self.message.splitlines()[0] if self.message else ""


def read_page(data: bytes, oid: str = "?") -> list[TreeEntry]:
    """The entries of the tree page stored as `data`."""
    raw = _parse(data, oid, "tree page")
    problem = first_error("tree_page", raw)
    if problem:
        raise CorruptObjectError(f"object {oid} is not a valid tree page: {problem}")
    return [TreeEntry(**e) for e in raw["entries"]]


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _parse(data: bytes, oid: str, what: str) -> dict:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptObjectError(f"object {oid} is not a {what}: {exc}") from None
