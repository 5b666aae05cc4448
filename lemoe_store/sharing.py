"""Porcelain for sharing and upkeep on a Repo: remotes, push, pull, clone, fsck, gc, reindex.

Mixed into `lemoe_store.repo.Repo`; the work is done by `stores.remotes` and `stores.maintenance`.
"""

from __future__ import annotations

from pathlib import Path

from .stores.maintenance import FsckReport, GcReport
from .stores.maintenance import fsck as check_store
from .stores.maintenance import gc as collect_garbage
from .stores.remotes import Remotes, Transfer
from .stores.remotes import clone as clone_store


class SharingMixin:
    # -- remotes -------------------------------------------------------------------------------------------
    def remotes(self) -> dict[str, str]:
        """Remote name -> URL."""
        return Remotes(self.store).list()

    def add_remote(self, name: str, url: str, *, default: bool = False) -> str:
        """Add a DVC remote (the first one becomes the default); return its normalised URL."""
        return Remotes(self.store).add(name, url, default)

    def remove_remote(self, name: str) -> None:
        Remotes(self.store).remove(name)

    def push(self, remote: str | None = None, *, all_refs: bool = False) -> Transfer:
        """Send the current branch (or every branch and tag) and its objects; fast-forward only."""
        return Remotes(self.store).push(remote, all_refs)

    def pull(self, remote: str | None = None) -> Transfer:
        """Fetch the remote's branches and tags, verify every object, fast-forward local refs."""
        return Remotes(self.store).pull(remote)

    @classmethod
    def clone(cls, url: str, directory: str | Path, *, remote: str = "origin"):
        """A new store in `directory` with the remote's full history, as a Repo."""
        return cls(clone_store(url, directory, remote))

    # -- upkeep ----------------------------------------------------------------------------------------------
    def fsck(self) -> FsckReport:
        """Verify every object's hash, every ref, manifest and tree."""
        return check_store(self.store)

    def gc(self, *, prune: bool = False) -> GcReport:
        """List (with prune, delete) objects no ref or reflog reaches, and leftover temp files."""
        return collect_garbage(self.store, prune)

    def reindex(self) -> int:
        """Rebuild index.db and cache/ from objects and refs; return the number of commits indexed."""
        return self.store.reindex()
