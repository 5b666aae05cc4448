"""Refs (`refs/heads/*`, `refs/tags/*`, `HEAD`) updated only by compare-and-swap, with a reflog."""

from __future__ import annotations

import getpass
import os
import re
import time
from pathlib import Path

from .errors import BadNameError, RefConflictError
from .fsutil import atomic_write
from .lock import store_lock
from .objects import check_object_id

HEADS = "refs/heads/"
TAGS = "refs/tags/"
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_ref_name(name: str, kind: str = "branch") -> str:
    """Validate a short branch/tag name the way `git check-ref-format --branch` does."""
    problem = None
    if not name or len(name) > 200:
        problem = "must be 1-200 characters"
    elif _BAD_CHARS.search(name) or "@{" in name or name == "@":
        problem = "contains a forbidden character (space, control, ~ ^ : ? * [ \\ or @{)"
    elif name.startswith(("-", "/")) or name.endswith(("/", ".", ".lock")):
        problem = "may not start with '-' or '/', nor end with '/', '.' or '.lock'"
    elif ".." in name or "//" in name or any(part.startswith(".") for part in name.split("/")):
        problem = "may not contain '..', '//' or a component starting with '.'"
    elif name == "HEAD":
        problem = "HEAD is reserved"
    if problem:
        raise BadNameError(f"invalid {kind} name {name[:80]!r}: {problem}")
    return name


def current_user() -> str:
    """Who is writing: recorded in reflogs and as a commit's author."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class RefStore:
    def __init__(self, root: Path) -> None:
        self.root = root  # the .lemoe directory

    # -- reading -------------------------------------------------------------------------------------
    def _path(self, ref: str) -> Path:
        if ref != "HEAD":
            if not ref.startswith((HEADS, TAGS)):
                raise BadNameError(f"not a ref: {ref!r}")
            check_ref_name(ref.split("/", 2)[2])
        return self.root / ref

    def read(self, ref: str) -> str | None:
        """The raw content of a ref file ('ref: …' or an object id), or None if absent."""
        try:
            return self._path(ref).read_text().strip()
        except FileNotFoundError:
            return None

    def head(self) -> tuple[str | None, str | None]:
        """(branch ref HEAD points at or None if detached, commit id or None if unborn)."""
        raw = self.read("HEAD") or f"ref: {HEADS}main"
        if raw.startswith("ref: "):
            ref = raw[5:]
            value = self.read(ref)
            return ref, (check_object_id(value) if value else None)
        return None, check_object_id(raw)

    def commit_of(self, ref: str) -> str | None:
        value = self.read(ref)
        return check_object_id(value) if value else None

    def list(self, prefix: str) -> dict[str, str]:
        base = self.root / prefix
        refs = {}
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    name = path.relative_to(base).as_posix()
                    refs[name] = check_object_id(path.read_text().strip())
        return refs

    def reflog(self, ref: str) -> list[dict]:
        path = self.root / "logs" / ref
        entries = []
        if path.is_file():
            for line in path.read_text().splitlines():
                head, _, message = line.partition("\t")
                old, new, who, when = head.split(" ", 3)
                entries.append({"old": old, "new": new, "who": who, "time": float(when), "message": message})
        return entries

    # -- writing -------------------------------------------------------------------------------------
    def set_if_equals(self, ref: str, old: str | None, new: str | None, message: str) -> None:
        """Point `ref` at `new` (None deletes it) only if it still points at `old`; log the change."""
        if new is not None:
            check_object_id(new)
        path = self._path(ref)
        with store_lock(self.root / "refs.lock", timeout=30):
            current = self.read(ref)
            if current != old:
                raise RefConflictError(f"{ref} moved (expected {old or 'nothing'}, found {current or 'nothing'})")
            if new is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, (new + "\n").encode())
            self._log(ref, old, new, message)

    def set_head(self, target: str, message: str) -> None:
        """HEAD becomes 'ref: refs/heads/X' (a branch) or a commit id (detached)."""
        if target.startswith(HEADS):
            self._path(target)
            content = f"ref: {target}"
        else:
            content = check_object_id(target)
        with store_lock(self.root / "refs.lock", timeout=30):
            _, old = self.head()
            atomic_write(self.root / "HEAD", (content + "\n").encode())
            _, new = self.head()
            self._log("HEAD", old, new, message)

    def _log(self, ref: str, old: str | None, new: str | None, message: str) -> None:
        zero = "0" * 64
        message = " ".join(message.split())  # one line: a newline can't forge a second entry
        line = f"{old or zero} {new or zero} {current_user()} {time.time():.3f}\t{message}\n"
        path = self.root / "logs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
