"""Content-addressed, immutable objects named by the sha256 of their bytes (`objects/ab/cdef…`)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import BadRevisionError, CorruptObjectError
from .fsutil import atomic_write

_OBJECT_ID = re.compile(r"^[0-9a-f]{64}$")


def object_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_object_id(oid: str) -> str:
    """Ids become paths: only exactly 64 lower-case hex digits are accepted."""
    if not isinstance(oid, str) or not _OBJECT_ID.match(oid):
        raise BadRevisionError(f"not an object id: {str(oid)[:80]!r}")
    return oid


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, oid: str) -> Path:
        check_object_id(oid)
        return self.root / oid[:2] / oid[2:]

    def __contains__(self, oid: str) -> bool:
        return self.path(oid).is_file()

    def put(self, data: bytes) -> str:
        oid = object_id(data)
        path = self.path(oid)
        if not path.is_file():
            atomic_write(path, data, mode=0o444)
        return oid

    def get(self, oid: str) -> bytes:
        """The object's bytes, verified against its id."""
        path = self.path(oid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptObjectError(f"object {oid} is missing ({path})") from None
        if object_id(data) != oid:
            raise CorruptObjectError(f"object {oid} is corrupt: its content hash does not match ({path})")
        return data

    def size(self, oid: str) -> int:
        return self.path(oid).stat().st_size

    def ids(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for fan in sorted(self.root.iterdir()):
            if fan.is_dir() and len(fan.name) == 2:
                for file in sorted(fan.iterdir()):
                    oid = fan.name + file.name
                    if _OBJECT_ID.match(oid):
                        yield oid

    def prefix_matches(self, prefix: str) -> list[str]:
        fan = self.root / prefix[:2]
        if not fan.is_dir():
            return []
        return sorted(fan.name + f.name for f in fan.iterdir() if (fan.name + f.name).startswith(prefix))
