"""Storage: content-addressed objects, refs with reflogs, commit manifests, the SQLite index.

This package trains nothing and knows no model; `lemoe_store.repo` composes it with the engine.
"""

from .errors import (
    AmbiguousRevisionError,
    BadNameError,
    BadRevisionError,
    CorruptObjectError,
    LockTimeoutError,
    NotAStoreError,
    RefConflictError,
    StoreError,
)
from .manifest import Commit, TreeEntry
from .store import STORE_DIR, Store

__all__ = [
    "STORE_DIR",
    "AmbiguousRevisionError",
    "BadNameError",
    "BadRevisionError",
    "Commit",
    "CorruptObjectError",
    "LockTimeoutError",
    "NotAStoreError",
    "RefConflictError",
    "Store",
    "StoreError",
    "TreeEntry",
]
