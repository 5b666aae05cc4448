"""Commit manifests: canonical JSON, validated against `schemas/commit.schema.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..schemas import first_error
from .errors import CorruptObjectError

FORMAT = 1


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

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format"] = FORMAT
        if self.reverts is None:
            del data["reverts"]
        return data

    def to_bytes(self) -> bytes:
        data = self.to_dict()
        problem = first_error("commit", data)
        if problem:
            raise ValueError(f"invalid commit manifest: {problem}")
        return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, oid: str = "?") -> Commit:
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptObjectError(f"object {oid} is not a commit manifest: {exc}") from None
        problem = first_error("commit", raw)
        if problem:
            raise CorruptObjectError(f"object {oid} is not a valid commit manifest: {problem}")
        raw.pop("format")
        raw["expert"] = TreeEntry(**raw["expert"]) if raw["expert"] else None
        raw["tree"] = [TreeEntry(**e) for e in raw["tree"]]
        return cls(**raw)

    @property
    def subject(self) -> str:
        return self.message.splitlines()[0] if self.message else ""
