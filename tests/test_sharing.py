"""Sharing on a tiny model: push / pull / clone through a local-directory DVC remote, export and load_version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_facts
from lemoe_store import LemoeError, load_version
from lemoe_store.cli import app
from lemoe_store.editing import find_adaptor
from lemoe_store.editing.batching import encode_prompt
from lemoe_store.repo import Repo
from lemoe_store.stores.maintenance import fsck
from lemoe_store.stores.remotes import RemoteError, Remotes

EDIT = dict(layer=2, rank=16, lr=2e-2, max_steps=80, batch_size=4, plan="original")
runner = CliRunner()


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tiny_llama_dir) -> Repo:
    """A store with three commits (four facts each), pushed to a local-directory remote."""
    root = tmp_path_factory.mktemp("origin")
    repo = Repo.init(root / "work", model=str(tiny_llama_dir), **EDIT)
    repo.commit(tiny_facts(), message="twelve tiny facts")
    remotes = Remotes(repo.store)
    remotes.add("origin", str(root / "remote"))
    report = remotes.push()
    assert report.updated == {"refs/heads/main": [None, repo.store.head()[1]]}
    return repo


def _lemoe(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _logits(repo: Repo, rev: str, prompts: list[str]) -> torch.Tensor:
    model, tokenizer = repo.model_at(rev)
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([encode_prompt(tokenizer, p)])).logits[0, -1:] for p in prompts])


def _remote_dir(repo: Repo) -> Path:
    return Path(Remotes(repo.store).list()["origin"])


def test_clone_has_the_full_log_and_identical_versions(origin, tmp_path):
    _lemoe("clone", str(_remote_dir(origin)), str(tmp_path / "copy"))
    copy = Repo.open(tmp_path / "copy")
    assert fsck(copy.store).ok
    log_origin = _lemoe("log", "--json", "--store", str(origin.store.root))
    assert _lemoe("log", "--json", "--store", str(copy.store.root)) == log_origin
    assert len(json.loads(log_origin)) == 3
    assert copy.store.head() == origin.store.head()
    prompts = [f.prompt for f in tiny_facts()] + ["0 1 2 3 4 5 6 7 8"]
    for rev in ("HEAD", "HEAD~1", "HEAD~2"):
        assert torch.equal(_logits(copy, rev, prompts), _logits(origin, rev, prompts)), rev


def test_ask_and_blame_in_a_clone_name_the_commits_the_origin_names(origin, tmp_path):
    """Objects that arrive by clone or pull are indexed as their refs move (no `reindex` needed)."""
    _lemoe("clone", str(_remote_dir(origin)), str(tmp_path / "copy"))
    copy = Repo.open(tmp_path / "copy")
    for fact in tiny_facts():
        theirs, ours = origin.ask(fact.prompt, max_new_tokens=2), copy.ask(fact.prompt, max_new_tokens=2)
        assert ours.commit is not None and (ours.commit, ours.expert) == (theirs.commit, theirs.expert)
        blamed = copy.blame(fact.prompt, max_new_tokens=2)
        assert blamed.routed_commit == ours.commit and all(m.commit for m in blamed.matches)


def test_pull_fast_forwards_and_refuses_a_diverged_branch(origin, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(_remote_dir(origin), remote)  # this test moves the remote's refs: use a copy
    _lemoe("clone", str(remote), str(tmp_path / "alice"))
    _lemoe("clone", str(remote), str(tmp_path / "bob"))
    alice, bob = Repo.open(tmp_path / "alice"), Repo.open(tmp_path / "bob")
    # Alice moves on and pushes: Bob fast-forwards.
    alice.commit(tiny_facts()[:2], message="restate two facts", batch_size=2)
    alice.tag("v1")
    assert Remotes(alice.store).push(all_refs=True).updated
    report = Remotes(bob.store).pull()
    assert report.updated["refs/heads/main"][1] == alice.store.head()[1]
    assert bob.store.tags() == alice.store.tags()
    assert Remotes(bob.store).pull().updated == {}  # nothing new: a no-op
    # Both commit: Bob's pull is refused and nothing moves; so is his push.
    alice.revert("HEAD")
    Remotes(alice.store).push()
    bob.commit(tiny_facts()[2:4], message="a different change", batch_size=2)
    before = bob.store.all_refs()
    with pytest.raises(RemoteError, match="not a fast-forward.*refs/heads/main"):
        Remotes(bob.store).pull()
    assert bob.store.all_refs() == before
    with pytest.raises(RemoteError, match="rejected.*pull first"):
        Remotes(bob.store).push()
    result = runner.invoke(app, ["pull", "--store", str(bob.store.root)])
    assert result.exit_code == 1 and "diverged" in result.output


def test_a_corrupted_remote_object_fails_clone_and_pull_loudly(origin, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(_remote_dir(origin), remote)
    victim = max((p for p in (remote / "files").rglob("*") if p.is_file() and not p.name.endswith(".dir")),
                 key=lambda p: p.stat().st_size)  # an expert's weights
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = runner.invoke(app, ["clone", str(remote), str(tmp_path / "copy")])
    assert result.exit_code == 1
    assert "corrupt" in result.output and "error:" in result.output
    assert not (tmp_path / "copy").exists()  # nothing half-written
    empty = Repo.init(tmp_path / "fresh", model=str(origin.store.config["base_model"]["id"]), **EDIT)
    Remotes(empty.store).add("broken", str(remote))
    with pytest.raises(RemoteError, match="corrupt"):
        Remotes(empty.store).pull("broken")
    assert empty.store.all_refs() == {}


def test_remote_names_and_missing_remotes_give_clear_errors(origin, tmp_path):
    remotes = Remotes(origin.store)
    with pytest.raises(RemoteError, match="invalid remote name"):
        remotes.add("../x", str(tmp_path))
    with pytest.raises(RemoteError, match="already exists"):
        remotes.add("origin", str(tmp_path))
    with pytest.raises(RemoteError, match="no remote named"):
        remotes.push("nowhere")
    result = runner.invoke(app, ["clone", str(tmp_path / "empty-remote"), str(tmp_path / "c")])
    assert result.exit_code == 1 and "holds no lemoe history" in result.output
    assert json.loads(_lemoe("remote", "list", "--json", "--store", str(origin.store.root))) == {
        "origin": str(_remote_dir(origin))}


def test_export_then_load_version_in_a_fresh_process_gives_the_same_logits(origin, tmp_path):
    out = tmp_path / "export"
    _lemoe("export", "HEAD~1", str(out), "--with-base", "--store", str(origin.store.root))
    manifest = json.loads((out / "lemoe_adapter.json").read_text())
    assert manifest["commit"] == origin.store.resolve("HEAD~1") and len(manifest["experts"]) == 2
    assert manifest["base_model"]["fingerprint"] == origin.store.config["base_model"]["fingerprint"]
    assert len((out / "facts.jsonl").read_text().splitlines()) == 8
    prompts = [f.prompt for f in tiny_facts()] + ["0 1 2 3 4 5 6 7 8"]
    script = (
        "import sys, json, torch; from lemoe_store import load_version\n"
        "from lemoe_store.editing.batching import encode_prompt\n"
        "from safetensors.torch import save_file\n"
        "model, tok = load_version(sys.argv[1], device='cpu')\n"
        "with torch.no_grad():\n"
        "    rows = [model(input_ids=torch.tensor([encode_prompt(tok, p)])).logits[0, -1:] for p in json.loads(sys.argv[2])]\n"
        "save_file({'logits': torch.cat(rows)}, sys.argv[3])\n"
    )
    result_file = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-c", script, str(out), json.dumps(prompts), str(result_file)], check=True,
                   cwd=tmp_path)
    from safetensors.torch import load_file

    expected = _logits(origin, "HEAD~1", prompts)
    assert torch.equal(load_file(result_file)["logits"], expected)
    # Without the base model copied, the folder loads against the same local base model, in this process too.
    light = tmp_path / "light"
    _lemoe("export", "HEAD~1", str(light), "--store", str(origin.store.root))
    assert not (light / "base").exists()
    model, tokenizer = load_version(light, device="cpu")
    with torch.no_grad():
        rows = [model(input_ids=torch.tensor([encode_prompt(tokenizer, p)])).logits[0, -1:] for p in prompts]
    assert torch.equal(torch.cat(rows), expected)
    result = runner.invoke(app, ["export", "HEAD", str(light), "--store", str(origin.store.root)])
    assert result.exit_code == 1 and "not an empty directory" in result.output


def test_an_export_keeps_each_anchors_span_and_subject(origin, tmp_path):
    """What routing needs beyond the keys travels too: the span closes the gate after the answer, the
    subject keeps neighbours out; an exported version generates exactly as the store's version does."""
    out = tmp_path / "export"
    _lemoe("export", "HEAD", str(out), "--store", str(origin.store.root))
    model, tokenizer = load_version(out, device="cpu")
    exported = find_adaptor(model).anchors
    stored, _ = origin.model_at("HEAD")
    anchors = find_adaptor(stored).anchors
    assert exported.spans.tolist() == anchors.spans.tolist() and max(anchors.spans) < 10
    assert exported.subjects.by_first_token == anchors.subjects.by_first_token and anchors.subjects.by_first_token
    prompt = torch.tensor([encode_prompt(tokenizer, tiny_facts()[0].prompt)])
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(input_ids=prompt, **options), stored.generate(input_ids=prompt, **options))


def test_attach_version_onto_a_users_own_model_in_another_dtype(origin, tiny_llama_dir, tiny_gpt2_dir):
    """peft-style: the user loads the base model (bfloat16 here); attach_version checks its fingerprint,
    attaches the version's experts and returns the same model; disable_experts gives the base model back."""
    from transformers import AutoModelForCausalLM

    from lemoe_store import attach_version, disable_experts, load_version

    prompt = tiny_facts()[0].prompt
    reference, tokenizer = load_version(origin.path, "HEAD~1", device="cpu")
    own = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    with torch.no_grad():
        base = own(input_ids=ids).logits
        assert attach_version(own, origin.path, "HEAD~1") is own
        edited = own(input_ids=ids).logits
        with disable_experts(own):
            assert torch.equal(own(input_ids=ids).logits, base)
        assert not torch.equal(edited, base) and edited.dtype == torch.bfloat16
        assert torch.equal(edited.argmax(-1)[0, -1], reference(input_ids=ids).logits.argmax(-1)[0, -1])
    assert len(find_adaptor(own).experts) == 2
    other = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(LemoeError, match="refusing to mix models"):
        attach_version(other, origin.path)
    assert find_adaptor(other) is None


def test_model_at_returns_independent_models(origin):
    old, _ = origin.model_at("HEAD~2")
    new, _ = origin.model_at("HEAD")
    assert old is not new
    assert (len(find_adaptor(old).experts), len(find_adaptor(new).experts)) == (1, 3)


def test_one_import_gives_the_public_api():
    import lemoe_store

    for name in ("Repo", "Fact", "load_facts", "attach_version", "load_version", "disable_experts", "EditConfig",
                 "LemoeError"):
        assert name in lemoe_store.__all__ and getattr(lemoe_store, name) is not None
    from lemoe_store import FactsError, ModelError, StoreError

    assert all(issubclass(e, LemoeError) for e in (FactsError, ModelError, StoreError))


PUSH_BRANCHES = """
import sys
from lemoe_store import Repo
repo = Repo.open(sys.argv[1])
for name in sys.argv[2:]:
    repo.checkout(name)
    repo.push()
"""


def _remote_refs(repo: Repo) -> dict[str, str]:
    from lemoe_store.stores.remotes import _documents

    remotes = Remotes(repo.store)
    with remotes._project() as project:
        return {ref: entry.commit for ref, entry in _documents(project, "origin").refs().items()}


def test_concurrent_pushes_of_different_branches_all_land(origin, tmp_path):
    clones = [Repo.clone(str(_remote_dir(origin)), tmp_path / side) for side in ("a", "b")]
    names = {}
    for side, clone in zip("ab", clones):
        names[side] = [f"{side}-{i}" for i in range(10)]
        for i, name in enumerate(names[side]):
            clone.branch(name, rev=f"HEAD~{i % 3}")
    pushes = [subprocess.Popen([sys.executable, "-c", PUSH_BRANCHES, str(clone.path), *names[side]],
                               stderr=subprocess.PIPE, text=True) for side, clone in zip("ab", clones)]
    for push in pushes:
        assert push.wait(timeout=300) == 0, push.stderr.read()
    arrived = _remote_refs(origin)
    for side, clone in zip("ab", clones):
        for name in names[side]:
            assert arrived[f"refs/heads/{name}"] == clone.resolve(name)


def test_a_race_on_one_branch_is_reported_never_lost(origin, tmp_path):
    clones = [Repo.clone(str(_remote_dir(origin)), tmp_path / side) for side in ("a", "b")]
    clones[0].revert("HEAD")  # two different new commits on main, no training needed
    clones[1].revert("HEAD~1")
    pushes = [subprocess.Popen([sys.executable, "-c", PUSH_BRANCHES, str(clone.path), "main"],
                               stderr=subprocess.PIPE, text=True) for clone in clones]
    codes = [push.wait(timeout=300) for push in pushes]
    assert sorted(codes) == [0, 1], codes
    winner, loser = (clones[0], pushes[1]) if codes[0] == 0 else (clones[1], pushes[0])
    assert "pull first" in loser.stderr.read()
    assert _remote_refs(origin)["refs/heads/main"] == winner.resolve("main")
