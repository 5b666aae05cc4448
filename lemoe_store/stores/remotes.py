"""Remotes: share a store's history through DVC (`lemoe remote / push / pull / clone`).

A remote is a DVC remote (any URL DVC understands; a local directory in the tests). Each store keeps a
small DVC project (`--no-scm`) in `.lemoe/dvc/` that only transfers:

- **objects** travel as DVC-tracked directories ("packs"): for each pushed ref, the objects reachable from
  its commit are staged as hard links, `dvc add`-ed and `dvc push`-ed into the remote's content-addressed
  storage (`files/md5/…`), which skips what the remote already holds;
- **refs** live in small JSON documents on the remote, one folder per ref (see `remote_refs`), each
  written after the objects, so a remote never names a missing pack; pushes of different refs never
  touch the same file, and a lost race on the same ref is reported ("pull first"), never lost.

Pull and clone fetch packs with DVC (remotes are added with `verify = true`, so DVC re-hashes every file it
downloads), check each object's sha256 again before it enters the store, and then move refs fast-forward
only, like `git pull --ff-only`: a diverged branch is refused and nothing is overwritten.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .objects import check_object_id, object_id
from .refs import HEADS, TAGS
from .remote_refs import RemoteDocuments, RemoteError
from .store import STORE_DIR, Store

_REMOTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PACK = "pack"  # staging directory (and .dvc file) of the pack being pushed or pulled


@dataclass
class Transfer:
    """What a push or pull did: refs moved (ref -> [old, new]), refs already equal, objects sent/received."""

    remote: str
    url: str
    updated: dict[str, list[str | None]] = field(default_factory=dict)
    up_to_date: list[str] = field(default_factory=list)
    objects: int = 0


def check_remote_name(name: str) -> str:
    if not isinstance(name, str) or not _REMOTE_NAME.match(name):
        raise RemoteError(f"invalid remote name {str(name)[:80]!r}: use letters, digits, '.', '_' or '-'")
    return name


def normalise_url(url: str) -> str:
    """DVC URLs pass through; a plain path becomes absolute (DVC would read it relative to its config)."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


@contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC logs progress at INFO; below the CLI nothing prints, so only its errors reach the logs."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dvc_project(directory: Path):
    """The DVC project in `directory`, created on first use (no SCM, no analytics, hard-linked cache).
    Callers hold `_quiet_dvc()`."""
    from dvc.repo import Repo as DvcRepo

    if not (directory / ".dvc").is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        project = DvcRepo.init(str(directory), no_scm=True)
        with project.config.edit() as conf:
            conf["core"]["analytics"] = False
            conf["cache"]["type"] = "hardlink,copy"
        project.close()
    return DvcRepo(str(directory))


class Remotes:
    """The remotes of one store, and push / pull against them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.directory = store.root / "dvc"

    # -- configuration ---------------------------------------------------------------------------------
    def add(self, name: str, url: str, default: bool = False) -> str:
        check_remote_name(name)
        if name in self.list():
            raise RemoteError(f"remote {name!r} already exists")
        url = normalise_url(url)
        with self.store.lock(timeout=30), self._project() as project:
            with project.config.edit() as conf:
                conf["remote"][name] = {"url": url, "verify": True}
                if default or not conf["core"].get("remote"):
                    conf["core"]["remote"] = name
        return url

    def remove(self, name: str) -> None:
        if name not in self.list():
            raise RemoteError(f"no remote named {name!r}")
        with self.store.lock(timeout=30), self._project() as project:
            with project.config.edit() as conf:
                del conf["remote"][name]
                if conf["core"].get("remote") == name:
                    del conf["core"]["remote"]

    def list(self) -> dict[str, str]:
        """Remote name -> URL."""
        if not (self.directory / ".dvc").is_dir():
            return {}
        with self._project() as project:
            return {name: conf["url"] for name, conf in project.config["remote"].items()}

    def default(self) -> str:
        with self._project() as project:
            name = project.config["core"].get("remote")
        if not name:
            raise RemoteError("no remote given and none configured (run `lemoe remote add NAME URL`)")
        return name

    @contextmanager
    def _project(self):
        """This store's DVC project, opened (and quiet) for one operation."""
        with _quiet_dvc():
            project = _dvc_project(self.directory)
            try:
                yield project
            finally:
                project.close()

    # -- push / pull ---------------------------------------------------------------------------------------
    def push(self, name: str | None = None, all_refs: bool = False) -> Transfer:
        """Send the current branch (or every branch and tag) and the objects it reaches; fast-forward only."""
        name, report = self._start_transfer(name)
        with self.store.lock(timeout=60), self._project() as project:
            refs = self._refs_to_push(all_refs)
            remote = _documents(project, name)
            meta = remote.meta() or remote.create_meta(self.store.config["base_model"], self.store.config["edit"])
            self._check_same_model(meta, name)
            remote_refs = remote.refs()
            for ref, cid in sorted(refs.items()):
                current = remote_refs.get(ref)
                if current is not None and current.commit == cid:
                    report.up_to_date.append(ref)
                    continue
                if current is not None and not self._fast_forward(ref, current.commit, cid):
                    raise RemoteError(
                        f"push to {name} rejected: {ref} there ({current.commit[:12]}) is not an ancestor of "
                        f"yours ({cid[:12]}); pull first (fast-forward only)"
                    )
                pack, count = self._push_pack(project, name, cid)
                remote.push_ref(ref, current, cid, pack)
                report.updated[ref] = [current.commit if current else None, cid]
                report.objects += count
            branch, _ = self.store.head()
            remote_branches = sorted(r[len(HEADS):] for r in remote.refs() if r.startswith(HEADS))
            if meta.get("head") not in remote_branches and remote_branches:  # the branch a clone checks out
                remote.set_head(branch if branch in remote_branches else remote_branches[0])
            self._clean(project)
        return report

    def pull(self, name: str | None = None) -> Transfer:
        """Fetch every branch and tag of the remote, verify its objects, and fast-forward the local refs.

        A local branch that has diverged from the remote's (or a tag that names another commit) refuses the
        whole pull before any ref moves.
        """
        name, report = self._start_transfer(name)
        with self.store.lock(timeout=60), self._project() as project:
            remote = _documents(project, name)
            meta = remote.meta()
            if meta is None:
                raise RemoteError(f"remote {name} ({report.url}) holds no lemoe history yet (push to it first)")
            self._check_same_model(meta, name)
            local = self.store.all_refs()
            remote_refs = remote.refs()
            wanted = {ref: entry for ref, entry in remote_refs.items() if local.get(ref) != entry.commit}
            report.up_to_date = sorted(set(remote_refs) - set(wanted))
            try:
                for pack in sorted({entry.pack for entry in wanted.values()}):
                    report.objects += self._pull_pack(project, name, pack)
            finally:
                self._clean(project)
            moves, refused = {}, []
            for ref, entry in sorted(wanted.items()):
                cid = entry.commit
                missing = self._missing_objects(cid)
                if missing:
                    raise RemoteError(f"remote {name}: {ref} ({cid[:12]}) lacks {len(missing)} object(s), "
                                      f"e.g. {sorted(missing)[0][:12]}")
                old = local.get(ref)
                if old is None or (ref.startswith(HEADS) and self.store.is_ancestor(old, cid)):
                    moves[ref] = [old, cid]
                elif ref.startswith(HEADS) and self.store.is_ancestor(cid, old):
                    report.up_to_date.append(ref)  # local is ahead: nothing to take
                else:
                    refused.append(f"{ref} (local {old[:12]}, {name} {cid[:12]})")
            if refused:
                raise RemoteError(
                    f"pull from {name} refused, not a fast-forward: {', '.join(refused)} have diverged; "
                    "nothing was changed (branch off, revert or replay your commits instead)"
                )
            for ref, (old, new) in moves.items():
                self.store.move_ref(ref, old, new, f"pull: from {name}")
            report.updated = moves
        return report

    # -- helpers -----------------------------------------------------------------------------------------
    def _start_transfer(self, name: str | None) -> tuple[str, Transfer]:
        name = check_remote_name(name or self.default())
        urls = self.list()
        if name not in urls:
            raise RemoteError(f"no remote named {name!r} (see `lemoe remote list`)")
        return name, Transfer(name, urls[name])

    def _check_same_model(self, meta: dict, name: str) -> None:
        ours = self.store.config["base_model"]["fingerprint"]
        theirs = (meta.get("base_model") or {}).get("fingerprint")
        if theirs != ours:
            raise RemoteError(
                f"remote {name} holds edits of another base model (fingerprint {str(theirs)[:12]}, "
                f"this store {ours[:12]}): refusing to mix models"
            )

    def _refs_to_push(self, all_refs: bool) -> dict[str, str]:
        if all_refs:
            refs = self.store.all_refs()
        else:
            branch, cid = self.store.head()
            if branch is None:
                raise RemoteError("HEAD is detached: check out a branch to push it, or push --all")
            refs = {f"{HEADS}{branch}": cid} if cid else {}
        if not refs:
            raise RemoteError("nothing to push: no commits yet")
        return refs

    def _fast_forward(self, ref: str, remote_cid: str, cid: str) -> bool:
        if ref.startswith(TAGS):
            return False  # a tag never moves
        return remote_cid in self.store.objects and self.store.is_ancestor(remote_cid, cid)

    def _push_pack(self, project, name: str, cid: str) -> tuple[str, int]:
        """Stage the objects `cid` reaches as one DVC directory, push it; return (its DVC hash, #objects)."""
        staging = self.directory / _PACK
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        oids = sorted(self.store.closure({cid}))
        for oid in oids:
            source = self.store.objects.path(oid)
            try:
                os.link(source, staging / oid)  # no copy: objects are immutable
            except OSError:
                shutil.copyfile(source, staging / oid)
        (stage,) = project.add([str(staging)])
        pack = stage.outs[0].hash_info.value
        project.push(targets=[str(self.directory / f"{_PACK}.dvc")], remote=name)
        return pack, len(oids)

    def _pull_pack(self, project, name: str, pack: str) -> int:
        """Fetch one pack with DVC, re-verify every object's sha256, add it to the store; return #new objects."""
        if not re.fullmatch(r"[0-9a-f]{32}\.dir", pack):
            raise RemoteError(f"remote {name}: malformed pack id {pack[:80]!r}")
        staging = self.directory / _PACK
        shutil.rmtree(staging, ignore_errors=True)
        pointer = self.directory / f"{_PACK}.dvc"
        pointer.write_text(f"outs:\n- md5: {pack}\n  hash: md5\n  path: {_PACK}\n")
        try:
            project.pull(targets=[str(pointer)], remote=name)
        except Exception as exc:  # DVC raises many types; its verify=true failure is a CheckoutError
            raise RemoteError(f"pull from {name} failed: pack {pack} is missing or corrupt on the remote "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        added = 0
        for file in sorted(staging.iterdir()):
            oid = check_object_id(file.name)
            data = file.read_bytes()
            if object_id(data) != oid:
                raise RemoteError(f"pull from {name}: object {oid} is corrupt (its content hash does not match)")
            if oid not in self.store.objects:
                self.store.objects.put(data)
                added += 1
        return added

    def _missing_objects(self, cid: str) -> set[str]:
        if cid not in self.store.objects:
            return {cid}
        return {oid for oid in self.store.closure({cid}) if oid not in self.store.objects}

    def _clean(self, project) -> None:
        """Drop the staging pack and DVC's transfer cache: the store's objects are the only copy kept."""
        shutil.rmtree(self.directory / _PACK, ignore_errors=True)
        (self.directory / f"{_PACK}.dvc").unlink(missing_ok=True)
        shutil.rmtree(self.directory / ".dvc" / "cache", ignore_errors=True)


def _documents(project, name: str) -> RemoteDocuments:
    remote = project.cloud.get_remote(name)
    return RemoteDocuments(remote.fs, remote.path, name)


def clone(url: str, directory: str | Path, name: str = "origin") -> Store:
    """A new store in `directory` with the remote's full history; HEAD on the remote's default branch."""
    target = Path(directory).expanduser().resolve()
    if (target / STORE_DIR).exists():
        raise RemoteError(f"{target / STORE_DIR} already exists")
    url = normalise_url(url)
    created = not target.exists()
    with tempfile.TemporaryDirectory(prefix="lemoe-clone-") as scratch, _quiet_dvc():
        project = _dvc_project(Path(scratch))
        try:
            with project.config.edit() as conf:
                conf["remote"][name] = {"url": url, "verify": True}
            meta = _documents(project, name).meta()
        finally:
            project.close()
    if meta is None:
        raise RemoteError(f"{url} holds no lemoe history (nothing was pushed there)")
    try:
        store = Store.init(target, meta["base_model"], meta["edit"])
        remotes = Remotes(store)
        remotes.add(name, url, default=True)
        remotes.pull(name)
        head = meta.get("head")
        if head and head in store.branches():
            store.checkout(head, f"clone: from {url}")
        elif store.branches():
            store.checkout(sorted(store.branches())[0], f"clone: from {url}")
    except BaseException:
        shutil.rmtree(target if created else target / STORE_DIR, ignore_errors=True)
        raise
    return store
