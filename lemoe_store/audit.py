"""The audit trail of served answers: `.lemoe/audit.db`, one row per answer `lemoe serve` gave.

It records what happened, so unlike `index.db` it is not derived from objects and refs: `reindex` and
`gc` never touch it and `push` never sends it. The server appends through an `AuditWriter`, which queues
rows and writes them in batches from its own thread, so a request never waits on SQLite's writer lock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlite_utils

AUDIT_FILE = "audit.db"
BASE = "base"  # `routed_commit` of an answer no expert gave


@dataclass(frozen=True)
class AuditRecord:
    time: float
    endpoint: str  # completions | chat.completions
    model: str  # the model name the client asked for (e.g. lemoe:main)
    version: str  # the commit the name resolved to
    routed_commit: str  # the commit that introduced the expert that answered, or "base"
    expert: int | None
    fact_id: str | None
    similarity: float | None
    prompt_sha256: str
    prompt: str | None  # None when the server runs with --no-log-prompts
    completion_tokens: int
    finish_reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def _open(path: Path) -> sqlite_utils.Database:
    db = sqlite_utils.Database(path)
    db.execute("PRAGMA journal_mode=WAL")  # `lemoe audit` reads while the server writes
    if "answers" not in db.table_names():
        db["answers"].create({
            "id": int, "time": float, "endpoint": str, "model": str, "version": str, "routed_commit": str,
            "expert": int, "fact_id": str, "similarity": float, "prompt_sha256": str, "prompt": str,
            "completion_tokens": int, "finish_reason": str,
        }, pk="id", if_not_exists=True)
        db["answers"].create_index(["routed_commit"], if_not_exists=True)
        db["answers"].create_index(["time"], if_not_exists=True)
    return db


def read_audit(store_root: Path, *, commit: str | None = None, fact_id: str | None = None,
               since: dt.datetime | None = None, limit: int | None = None) -> list[AuditRecord]:
    """Served answers, oldest first, filtered by routed commit (or "base"), fact id and time."""
    path = store_root / AUDIT_FILE
    if not path.exists():
        return []
    where, args = [], []
    for column, value in (("routed_commit", commit), ("fact_id", fact_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("time >= ?")
        args.append(since.timestamp())
    fields = [f for f in AuditRecord.__dataclass_fields__]
    db = _open(path)
    try:
        rows = db["answers"].rows_where(" and ".join(where) or None, args, order_by="id desc", limit=limit,
                                        select=", ".join(fields))
        return [AuditRecord(**row) for row in reversed(list(rows))]
    finally:
        db.close()


def count_served(store_root: Path, commit: str) -> int:
    """How many served answers the expert introduced by `commit` gave."""
    path = store_root / AUDIT_FILE
    if not path.exists():
        return 0
    db = _open(path)
    try:
        return db["answers"].count_where("routed_commit = ?", [commit])
    finally:
        db.close()


class AuditWriter:
    """Appends records from any thread without blocking on SQLite: a queue, drained in batches by one thread."""

    batch = 256

    def __init__(self, store_root: Path) -> None:
        self.path = store_root / AUDIT_FILE
        self._queue: queue.Queue[AuditRecord | None] = queue.Queue()
        _open(self.path).close()  # fail at start-up, not at the first answer, if it cannot be written
        self._thread = threading.Thread(target=self._run, name="lemoe-audit", daemon=True)
        self._thread.start()

    def append(self, record: AuditRecord) -> None:
        self._queue.put(record)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        db = _open(self.path)
        try:
            running = True
            while running:
                records = [self._queue.get()]
                while len(records) < self.batch:
                    try:
                        records.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                running = None not in records
                rows = [r.to_dict() for r in records if r is not None]
                if rows:
                    with db.conn:
                        db["answers"].insert_all(rows)
        finally:
            db.close()
