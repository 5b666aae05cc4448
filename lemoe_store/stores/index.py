"""`index.db`: a derived SQLite index (sqlite-utils) of commits, facts, experts, metrics and refs.

It is never the source of truth: `rebuild` recreates it from objects and refs. Schema changes are
ordered, recorded migrations (`_migrations` table), applied on every open, as in simonw/llm.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlite_utils

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["commits"].create(
        {
            "id": str, "kind": str, "parent": str, "author": str, "time": float, "message": str,
            "facts_count": int, "experts_active": int, "expert": str,
            "rel": float, "gen": float, "loc": float, "seconds": float,
        },
        pk="id",
    )
    db["facts"].create(
        {"id": int, "commit_id": str, "fact_id": str, "prompt": str, "target": str, "subject": str}, pk="id"
    )
    db["facts"].create_index(["commit_id"])
    db["facts"].create_index(["fact_id"])
    db["facts"].enable_fts(["prompt", "target", "subject"], create_triggers=True)
    db["experts"].create(
        {"id": str, "commit_id": str, "anchors": str, "facts": str, "bytes": int, "anchors_count": int}, pk="id"
    )
    db["metrics"].create({"commit_id": str, "name": str, "value": float}, pk=("commit_id", "name"))
    db["refs"].create({"name": str, "target": str}, pk="name")


def open_index(path: Path) -> sqlite_utils.Database:
    db = sqlite_utils.Database(path)
    db.execute("PRAGMA journal_mode=WAL")  # readers never block on the writer
    applied = {row["name"] for row in db["_migrations"].rows} if "_migrations" in db.table_names() else set()
    for fn in MIGRATIONS:
        if fn.__name__ not in applied:
            with db.conn:
                fn(db)
                db["_migrations"].insert({"name": fn.__name__}, pk="name")
    return db


def add_commit(db: sqlite_utils.Database, cid: str, record: dict, facts: list[dict], expert: dict | None) -> None:
    """Index one commit (idempotent)."""
    with db.conn:
        if db["commits"].count_where("id = ?", [cid]):
            return
        metrics = record.pop("metrics", {})
        db["commits"].insert({"id": cid, **record, **{k: metrics.get(k) for k in ("rel", "gen", "loc", "seconds")}})
        db["metrics"].insert_all(
            [{"commit_id": cid, "name": k, "value": float(v)} for k, v in metrics.items() if isinstance(v, (int, float))],
            replace=True,
        )
        db["facts"].insert_all([{"commit_id": cid, **f} for f in facts])
        if expert:
            db["experts"].insert({"commit_id": cid, **expert}, ignore=True)  # keep the introducing commit


def clear(db: sqlite_utils.Database) -> None:
    """Empty every table (one transaction: readers see the old index or the empty one)."""
    with db.conn:
        for table in ("commits", "facts", "experts", "metrics", "refs"):
            db[table].delete_where()


def set_refs(db: sqlite_utils.Database, refs: dict[str, str]) -> None:
    with db.conn:
        db["refs"].delete_where()
        db["refs"].insert_all([{"name": k, "target": v} for k, v in refs.items()])


def indexed_refs(db: sqlite_utils.Database) -> dict[str, str]:
    return {row["name"]: row["target"] for row in db["refs"].rows}


def search_commits(db: sqlite_utils.Database, text: str) -> set[str]:
    """Commits whose message contains `text`, or whose facts match it (full-text search)."""
    hits = {r["id"] for r in db.query("select id from commits where message like ?", [f"%{text}%"])}
    hits |= {r["commit_id"] for r in db["facts"].search(text, columns=["commit_id"], quote=True)}
    return hits


def commits_introducing(db: sqlite_utils.Database, expert_id: str) -> list[str]:
    return [r["commit_id"] for r in db["experts"].rows_where("id = ?", [expert_id])]
