"""Flipped bytes are detected, named, and found by fsck; a damaged index is rebuilt with nothing lost."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import tiny_facts
from helpers import EDIT
from lemoe_store.cli import app
from lemoe_store.repo import Repo
from lemoe_store.stores import CorruptObjectError
from lemoe_store.stores.maintenance import fsck

runner = CliRunner()


@pytest.fixture
def repo(tmp_path, tiny_llama_dir):
    repo = Repo.init(tmp_path / "store", model=str(tiny_llama_dir), **EDIT)
    repo.commit(tiny_facts(), message="integrity")
    return repo


def _flip(repo: Repo, oid: str, offset: int) -> None:
    path = repo.store.objects.path(oid)
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["expert", "anchors", "facts", "manifest"])
@pytest.mark.parametrize("offset", [0, 7, 1000, -1])
def test_a_flipped_byte_is_detected(repo, kind, offset):
    cid, commit = repo.log()[0]
    oid = cid if kind == "manifest" else getattr(commit.expert, kind)
    _flip(repo, oid, offset)
    report = fsck(repo.store)
    assert not report.ok and any(oid in p for p in report.problems)
    fresh = Repo.open(repo.store.root)
    with pytest.raises(CorruptObjectError, match=oid) as info:
        fresh.model_at("HEAD") if kind != "facts" else fresh.facts_at("HEAD")
    if kind in ("expert", "anchors"):
        assert cid[:12] in str(info.value)  # names the commits that use it
    result = runner.invoke(app, ["fsck", "--store", str(repo.store.root)])
    assert result.exit_code == 1


def test_damaged_index_and_cache_are_rebuilt(repo):
    store = ["--store", str(repo.store.root)]
    before = runner.invoke(app, ["log", *store]).stdout
    grep = runner.invoke(app, ["log", "--oneline", "--grep", "Kofi", *store]).stdout
    (repo.store.root / "index.db").write_bytes(b"this is not a database" * 100)
    for extra in repo.store.root.glob("index.db-*"):
        extra.unlink()
    (repo.store.root / "cache" / "junk").write_text("x")
    assert runner.invoke(app, ["reindex", *store]).exit_code == 0
    assert runner.invoke(app, ["log", *store]).stdout == before
    assert runner.invoke(app, ["log", "--oneline", "--grep", "Kofi", *store]).stdout == grep
    assert "integrity" in grep
    assert not (repo.store.root / "cache" / "junk").exists()
