"""Shared helpers of the reliability suite: stores to break, subprocess commits, snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

EDIT = dict(layer=2, rank=16, lr=2e-2, max_steps=80, batch_size=8, plan="original")


def lemoe(*args: str, stdin=None) -> subprocess.Popen:
    """Start `python -m lemoe_store ARGS` (the real CLI, in its own process)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lemoe_store", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, stdin=stdin)


def write_facts(path: Path, facts) -> Path:
    path.write_text("".join(json.dumps(f.to_record()) + "\n" for f in facts))
    return path


def tree_hash(store_root: Path) -> str:
    """Hash of everything in the store that is history (the derived index.db is left out)."""
    digest = hashlib.sha256()
    for path in sorted(store_root.rglob("*")):
        if path.is_file() and not path.name.startswith("index.db"):
            digest.update(str(path.relative_to(store_root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
