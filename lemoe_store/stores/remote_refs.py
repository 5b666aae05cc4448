"""The lemoe documents on a DVC remote: what it holds (`lemoe/remote.json`) and one folder per ref.

    lemoe/remote.json                       base model (fingerprint), adaptor settings, default branch
    lemoe/refs/heads/main/00000001.json     {"commit", "pack", "token"}: one document per update
    lemoe/refs/heads/main/00000002.json     ... a ref is its highest-numbered document
    lemoe/refs/tags/v1/00000001.json

A push of a ref creates the next-numbered document and never overwrites one, so pushes of different
refs never touch the same file, and two pushes of the same ref ask for the same new file name: the second
finds it taken (created exclusively where the filesystem can, and read back after writing everywhere) and
is told to pull first. Nothing is lost silently.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

from .errors import StoreError
from .objects import check_object_id
from .refs import HEADS, TAGS, check_ref_name

FORMAT = 2
_LEGACY = "refs.json"  # format 1: every ref in one document (last writer won); still read


class RemoteError(StoreError):
    pass


@dataclass(frozen=True)
class RemoteRef:
    commit: str
    pack: str  # the DVC directory hash of the objects the commit reaches
    number: int  # which update of the ref this is (0: read from a format-1 remote)


class RemoteDocuments:
    def __init__(self, fs, path: str, name: str) -> None:
        self.fs = fs
        self.root = fs.join(path, "lemoe")
        self.name = name  # the remote's name, for messages

    # -- what the remote holds ---------------------------------------------------------------------------
    def meta(self) -> dict | None:
        """{format, base_model, edit, head}, or None if nothing was ever pushed here."""
        data = self._read(self.fs.join(self.root, "remote.json"))
        if data is None:
            legacy = self._read(self.fs.join(self.root, _LEGACY))
            return None if legacy is None else {"format": FORMAT, **{k: legacy.get(k) for k in ("base_model", "edit", "head")}}
        if data.get("format") != FORMAT or "fingerprint" not in data.get("base_model", {}):
            raise RemoteError(f"remote {self.name}: lemoe/remote.json is not a lemoe remote of format {FORMAT}")
        return data

    def create_meta(self, base_model: dict, edit: dict) -> dict:
        """Describe the remote on its first push (if two first pushes race, the first one's stays)."""
        data = {"format": FORMAT, "base_model": base_model, "edit": edit, "head": None}
        self.fs.makedirs(self.root, exist_ok=True)
        try:
            self._create(self.fs.join(self.root, "remote.json"), data)
        except FileExistsError:
            pass
        return self.meta()

    def set_head(self, branch: str) -> None:
        """The branch a clone checks out (replaced whole: readers see the old or the new document)."""
        self._replace(self.fs.join(self.root, "remote.json"), {**self.meta(), "head": branch})

    # -- refs ------------------------------------------------------------------------------------------------
    def refs(self) -> dict[str, RemoteRef]:
        found: dict[str, RemoteRef] = {}
        legacy = self._read(self.fs.join(self.root, _LEGACY))
        for ref, entry in (legacy or {}).get("refs", {}).items():
            found[ref] = self._checked(ref, entry, 0, _LEGACY)
        refs_dir = self.fs.join(self.root, "refs")
        files = self.fs.find(refs_dir) if self.fs.exists(refs_dir) else []
        latest: dict[str, tuple[int, str]] = {}
        for file in files:
            relative = file[len(refs_dir.rstrip("/")) + 1 :].replace(os.sep, "/")
            ref, _, leaf = relative.rpartition("/")
            if not leaf.endswith(".json") or not leaf[:-5].isdigit():
                continue  # a temporary file of a write in flight (name.json.tmp-…)
            number = int(leaf[:-5])
            if number > latest.get(f"refs/{ref}", (0, ""))[0]:
                latest[f"refs/{ref}"] = (number, file)
        for ref, (number, file) in latest.items():
            found[ref] = self._checked(ref, self._read(file), number, file)
        return found

    def push_ref(self, ref: str, after: RemoteRef | None, commit: str, pack: str) -> None:
        """Record `ref` -> `commit` as the update that follows `after` (None: a new ref)."""
        number = (after.number if after else 0) + 1
        folder = self.fs.join(self.root, *ref.split("/"))
        path = self.fs.join(folder, f"{number:08d}.json")
        token = uuid.uuid4().hex
        self.fs.makedirs(folder, exist_ok=True)
        try:
            self._create(path, {"commit": commit, "pack": pack, "token": token})
            won = (self._read(path) or {}).get("token") == token
        except FileExistsError:
            won = False
        if not won:
            raise RemoteError(f"push to {self.name} rejected: {ref} moved on the remote while this push ran; "
                              "pull first")

    # -- files -------------------------------------------------------------------------------------------------
    def _checked(self, ref: str, entry: dict | None, number: int, where: str) -> RemoteRef:
        try:
            if not ref.startswith((HEADS, TAGS)):
                raise ValueError(f"bad ref {ref[:80]!r}")
            check_ref_name(ref.split("/", 2)[2])
            return RemoteRef(check_object_id(entry["commit"]), str(entry["pack"]), number)
        except (ValueError, KeyError, TypeError, StoreError) as exc:
            raise RemoteError(f"remote {self.name}: {where} is unreadable: {exc}") from None

    def _read(self, path: str) -> dict | None:
        if not self.fs.exists(path):
            return None
        try:
            data = json.loads(self.fs.cat_file(path))
        except (ValueError, OSError) as exc:
            raise RemoteError(f"remote {self.name}: {path} is unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise RemoteError(f"remote {self.name}: {path} is not a JSON object")
        return data

    def _create(self, path: str, data: dict) -> None:
        """Write a new file whole; FileExistsError if it exists.

        On a local or mounted remote the file is written aside and hard-linked into place, which is atomic
        and fails if the name is taken, so readers never see half a document. Object stores write objects
        whole; there the name is checked first and the caller reads the file back."""
        payload = json.dumps(data, indent=2, sort_keys=True).encode()
        if self.fs.protocol != "local":
            if self.fs.exists(path):
                raise FileExistsError(path)
            self.fs.pipe_file(path, payload)
            return
        temp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(temp, "wb") as handle:
            handle.write(payload)
        try:
            os.link(temp, path)
        finally:
            os.unlink(temp)

    def _replace(self, path: str, data: dict) -> None:
        temp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fs.pipe_file(temp, json.dumps(data, indent=2, sort_keys=True).encode())
        self.fs.mv(temp, path)
