"""Two writers on one store both land, one after the other; readers never wait for a writer."""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import tiny_facts
from helpers import EDIT, lemoe, write_facts
from lemoe_store.cli import app
from lemoe_store.repo import Repo
from lemoe_store.stores.maintenance import fsck


def test_two_concurrent_commits_both_land(tmp_path, tiny_llama_dir):
    repo = Repo.init(tmp_path / "store", model=str(tiny_llama_dir), **EDIT)
    facts = tiny_facts()
    first = write_facts(tmp_path / "a.jsonl", facts[:6])
    second = write_facts(tmp_path / "b.jsonl", facts[6:])
    writers = [lemoe("commit", str(path), "--store", str(repo.store.root), "-m", path.stem)
               for path in (first, second)]
    results = [(w.wait(timeout=300), w.stderr.read()) for w in writers]
    assert [code for code, _ in results] == [0, 0], results
    assert any("waiting for lock held by pid" in err for _, err in results)
    log = repo.log()
    assert sorted(c.subject for _, c in log) == ["a", "b"]
    assert log[0][1].parents == [log[1][0]]  # in sequence, none lost
    assert len(repo.facts_at()) == 12 and fsck(repo.store).ok


def test_readers_do_not_block_on_the_writer_lock(tmp_path, tiny_llama_dir):
    repo = Repo.init(tmp_path / "store", model=str(tiny_llama_dir), **EDIT)
    repo.commit(tiny_facts()[:6])
    runner = CliRunner()
    store = ["--store", str(repo.store.root)]
    with repo.store.lock():  # a writer is busy
        for args in (["log", "--oneline"], ["status"], ["ask", tiny_facts()[0].prompt], ["blame", "hello"]):
            result = runner.invoke(app, [*args, *store])
            assert result.exit_code == 0, result.output
