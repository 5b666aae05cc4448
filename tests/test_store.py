"""The versioned store on a tiny model: commit, log, checkout, ask, reindex, integrity, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_facts
from lemoe_store.cli import app
from lemoe_store.editing.batching import encode_prompt
from lemoe_store.repo import Repo
from lemoe_store.stores import BadNameError, BadRevisionError, CorruptObjectError, Store
from lemoe_store.stores.refs import check_ref_name

EDIT = dict(layer=2, rank=16, lr=2e-2, max_steps=80, batch_size=6, plan="original")
runner = CliRunner()


@pytest.fixture
def repo(tmp_path, tiny_llama_dir) -> Repo:
    return Repo.init(tmp_path / "work", model=str(tiny_llama_dir), **EDIT)


def _tree_snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.startswith("index.db")}


def test_commit_log_checkout_ask_roundtrip(repo):
    facts = tiny_facts()
    base_answers = {f.prompt: repo.ask(f.prompt, max_new_tokens=8).text for f in facts}
    first, second = repo.commit(facts, message="tiny facts")
    assert [cid for cid, _ in repo.log()] == [second, first]
    assert repo.store.read_commit(second).parents == [first]
    assert len(repo.store.read_commit(second).tree) == 2

    newest = [f for f in facts if f.id in {f.id for f in repo.show("HEAD").facts}]
    for fact in newest:
        answer = repo.ask(fact.prompt, max_new_tokens=8)
        assert answer.text.strip().startswith(fact.target) and str(answer) == answer.text
        assert answer.commit == second

    repo.checkout("HEAD~1")
    assert repo.store.head() == (None, first)
    for fact in newest:
        answer = repo.ask(fact.prompt, max_new_tokens=8)
        assert answer.text == base_answers[fact.prompt]
        assert answer.commit is None

    repo.checkout("main")
    assert repo.store.head() == ("main", second)
    assert repo.ask(newest[0].prompt, max_new_tokens=8).commit == second
    assert repo.evaluate().rel == 1.0


def test_answers_are_bit_for_bit_reproducible_across_processes(repo, tmp_path):
    facts = tiny_facts()[:6]
    repo.commit(facts)
    model, tokenizer = repo.model_at("HEAD")
    ids = torch.tensor([encode_prompt(tokenizer, facts[0].prompt)])
    with torch.no_grad():
        here = model(input_ids=ids).logits
        # Experts are stored in float16, and the model that trained them was rounded the same way.
        live, _ = repo._shared_model_at("HEAD")
        assert torch.equal(live(input_ids=ids).logits, here)
    stored = {name: w.dtype for a in repo.experts_at(repo.resolve("HEAD")) for name, w in a.weights.items()}
    assert {dtype for name, dtype in stored.items() if not name.endswith(".anchor_images")} == {torch.float16}
    assert {dtype for name, dtype in stored.items() if name.endswith(".anchor_images")} == {torch.float32}  # as anchors
    script = (
        "import sys, torch; from lemoe_store.repo import Repo; from lemoe_store.editing.batching import encode_prompt\n"
        "repo = Repo.open(sys.argv[1], device='cpu'); model, tok = repo.model_at('HEAD')\n"
        "ids = torch.tensor([encode_prompt(tok, sys.argv[2])])\n"
        "from safetensors.torch import save_file\n"
        "with torch.no_grad(): save_file({'logits': model(input_ids=ids).logits}, sys.argv[3])\n"
    )
    out = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-c", script, str(repo.store.root), facts[0].prompt, str(out)], check=True)
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["logits"], here)


def test_revisions_resolve_like_git(repo):
    first, second = repo.commit(tiny_facts())
    store = repo.store
    assert store.resolve("HEAD") == second
    assert store.resolve("HEAD^") == first
    assert store.resolve("HEAD~1") == first
    assert store.resolve("main~1") == first
    assert store.resolve(second[:7]) == second
    with pytest.raises(BadRevisionError):
        store.resolve("HEAD~2")
    with pytest.raises(BadRevisionError):
        store.resolve("nosuchbranch")
    with pytest.raises(BadRevisionError):
        store.resolve("../../etc/passwd")
    repo.checkout(first, new_branch="old")
    assert store.head() == ("old", first)
    assert store.branches() == {"main": second, "old": first}


def test_ancestry_is_walked_in_the_index_and_without_one_in_the_objects(repo, monkeypatch):
    first, second = repo.commit(tiny_facts())
    store = repo.store
    store.sync_index()
    reads: list[str] = []
    original = Store.read_commit
    monkeypatch.setattr(Store, "read_commit", lambda self, cid: reads.append(cid) or original(self, cid))
    assert store.resolve("HEAD~1") == first and reads == []  # HEAD~500 need not read 500 commit objects
    for damaged in store.root.glob("index.db*"):
        damaged.unlink()
    fresh = Store(store.root)  # no index yet: the commit objects answer
    assert fresh.resolve("HEAD~1") == first and reads == [second]
    with pytest.raises(BadRevisionError):
        fresh.resolve("HEAD~2")


@pytest.mark.parametrize("name", ["../x", "-rf", "a..b", "/abs", "a b", "x.lock", ".hidden", "a//b", "HEAD", ""])
def test_bad_ref_names_are_refused(name):
    with pytest.raises(BadNameError):
        check_ref_name(name)


def test_corrupted_object_is_detected(repo):
    (cid,) = repo.commit(tiny_facts()[:6])
    expert_id = repo.store.read_commit(cid).expert.expert
    path = repo.store.objects.path(expert_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    fresh = Repo.open(repo.store.root)
    with pytest.raises(CorruptObjectError, match=expert_id):
        fresh.model_at("HEAD")


def test_reindex_restores_identical_log(repo):
    repo.commit(tiny_facts(), message="facts for reindex")
    store_arg = ["--store", str(repo.store.root)]
    before = runner.invoke(app, ["log", *store_arg])
    grep_before = runner.invoke(app, ["log", "--oneline", "--grep", "Okafor", *store_arg])
    assert before.exit_code == 0 and "facts for reindex" in before.output
    for path in repo.store.root.glob("index.db*"):
        path.unlink()
    assert runner.invoke(app, ["reindex", *store_arg]).exit_code == 0
    assert runner.invoke(app, ["log", *store_arg]).output == before.output
    assert runner.invoke(app, ["log", "--oneline", "--grep", "Okafor", *store_arg]).output == grep_before.output


def test_bad_facts_file_fails_cleanly_and_leaves_store_unchanged(repo, tmp_path):
    good = tiny_facts()[0].to_record()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "Who?", "target": ""}) + "\n")
    before = _tree_snapshot(repo.store.root)
    result = runner.invoke(app, ["commit", str(bad), "--store", str(repo.store.root)])
    assert result.exit_code == 1
    assert f"{bad}:2: target:" in result.output
    assert _tree_snapshot(repo.store.root) == before


def test_cli_init_commit_log_show_status(tmp_path, tiny_llama_dir, facts_file):
    work = tmp_path / "cli"
    result = runner.invoke(app, ["init", str(work), "--model", str(tiny_llama_dir), "--layer", "2", "--rank", "16"])
    assert result.exit_code == 0, result.output
    store_arg = ["--store", str(work)]
    result = runner.invoke(app, ["commit", str(facts_file), "-m", "cli facts", "--batch-size", "12", "--json", *store_arg])
    assert result.exit_code == 0, result.output
    (created,) = json.loads(result.stdout)
    assert created["metrics"]["facts"] == 12
    log = json.loads(runner.invoke(app, ["log", "--json", *store_arg]).stdout)
    assert [c["id"] for c in log] == [created["id"]] and log[0]["experts_active"] == 1
    shown = json.loads(runner.invoke(app, ["show", "HEAD", "--json", *store_arg]).stdout)
    assert len(shown["facts"]) == 12 and shown["expert_bytes"] > 0
    assert shown["format"] == 2 and len(shown["tree_pages"]) == 1 and shown["experts_active"] == 1
    status = json.loads(runner.invoke(app, ["status", "--json", *store_arg]).stdout)
    assert status["experts_active"] == 1 and status["branch"] == "main"
    ask = json.loads(runner.invoke(app, ["ask", tiny_facts()[0].prompt, "--json", *store_arg]).stdout)
    assert ask["commit"] == created["id"]
    assert runner.invoke(app, ["checkout", "nope", *store_arg]).exit_code == 1


def test_store_refuses_a_different_base_model(repo, tiny_gpt2_dir):
    repo.commit(tiny_facts()[:6])
    config_path = repo.store.root / "config.json"
    config = json.loads(config_path.read_text())
    config["base_model"]["id"] = str(tiny_gpt2_dir)
    config_path.write_text(json.dumps(config))
    with pytest.raises(Exception, match="fingerprint"):
        Repo.open(repo.store.root).ask("hello")


def test_store_refuses_unknown_format_version(repo):
    config_path = repo.store.root / "config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(Exception, match="format 99"):
        Store.find(repo.store.root)
