"""History operations on a tiny model: revert, replay, blame, diff, branches, tags, fsck, gc."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_facts
from lemoe_store.cli import app
from lemoe_store.editing.batching import encode_prompt
from lemoe_store.repo import Repo
from lemoe_store.schemas.facts import Fact
from lemoe_store.stores import StoreError
from lemoe_store.stores.maintenance import fsck, gc

EDIT = dict(layer=2, rank=16, lr=2e-2, max_steps=80, batch_size=4, plan="original")
runner = CliRunner()


@pytest.fixture
def repo(tmp_path, tiny_llama_dir) -> Repo:
    repo = Repo.init(tmp_path / "work", model=str(tiny_llama_dir), **EDIT)
    repo.commit(tiny_facts(), message="three batches")
    return repo


def _logits(repo: Repo, rev: str, prompt: str) -> torch.Tensor:
    model, tokenizer = repo.model_at(rev)
    with torch.no_grad():
        return model(input_ids=torch.tensor([encode_prompt(tokenizer, prompt)])).logits


def _batch_facts(repo: Repo, rev: str) -> list[str]:
    return [f.prompt for f in repo.show(rev).facts]


def test_revert_middle_commit_undoes_exactly_that_commit(repo):
    third, second, first = [cid for cid, _ in repo.log()]
    middle = _batch_facts(repo, second)
    others = [f for f in tiny_facts() if f.prompt not in middle]
    reverted = repo.revert(second)
    commit = repo.store.read_commit(reverted)
    assert commit.kind == "revert" and commit.parents == [third] and commit.reverts == second
    assert [e.expert for e in commit.tree] == [e.expert for e in repo.store.read_commit(third).tree
                                               if e != repo.store.read_commit(second).expert]
    for prompt in middle:  # as if the middle batch had never been edited
        assert torch.equal(_logits(repo, "HEAD", prompt), _logits(repo, first, prompt))
    assert repo.evaluate(others).rel == 1.0
    assert repo.evaluate([f for f in tiny_facts() if f.prompt in middle]).rel < 1.0

    objects_before = set(repo.store.objects.ids())
    restored = repo.revert(reverted)
    new_objects = set(repo.store.objects.ids()) - objects_before
    assert new_objects == {restored}  # no retraining: only the new manifest
    assert [e.expert for e in repo.store.read_commit(restored).tree] == \
        [e.expert for e in repo.store.read_commit(third).tree]
    assert repo.evaluate(tiny_facts()).rel == 1.0
    with pytest.raises(StoreError, match="already active"):
        repo.revert(reverted)


@pytest.mark.parametrize("order", ["cluster", "original", "random", "reverse"])
def test_replay_keeps_the_facts_on_a_new_branch(repo, order):
    head_before = repo.store.head()
    created, rows = repo.replay(f"replay-{order}", plan=order, seed=1)
    assert repo.store.head() == head_before  # the original branch and HEAD are untouched
    assert repo.store.branches()[f"replay-{order}"] == created[-1]

    def multiset(rev: str) -> Counter:
        return Counter((f.prompt, f.target) for f in repo.facts_at(rev))

    assert multiset(f"replay-{order}") == multiset("main")
    assert [r.label for r in rows] == ["source", f"replay-{order}"]
    assert rows[1].batches == 3 and rows[1].rel == 1.0


def test_blame_names_the_commit_of_every_edited_prompt(repo):
    by_prompt = {}
    for cid, commit in repo.log():
        for record in repo.store.read_facts(commit.expert.facts):
            by_prompt[record["prompt"]] = cid
    for prompt, cid in by_prompt.items():
        blame = repo.blame(prompt, max_new_tokens=4)
        assert blame.routed_commit == cid
        assert blame.matches[0].commit == cid and blame.matches[0].prompt == prompt
        assert blame.answer == repo.ask(prompt, max_new_tokens=4).text
        assert blame.answer_without_expert is not None
    unrelated = repo.blame("0 1 2 3 4 5 6 7 8", max_new_tokens=4)
    assert unrelated.routed_commit is None and unrelated.answer_without_expert is None


def test_blame_fact_finds_introducing_and_overwriting_commits(repo):
    first = repo.log()[-1][0]
    fact = next(f for f in tiny_facts() if f.prompt in _batch_facts(repo, first))
    found = repo.blame_fact(fact.prompt)
    assert found.introduced_by == first == found.last_changed_by and found.active
    (overwrite,) = repo.commit([Fact(prompt=fact.prompt, target="Tokyo")], message="overwrite")
    found = repo.blame_fact(fact.id if False else fact.prompt)
    assert (found.introduced_by, found.last_changed_by, found.target) == (first, overwrite, "Tokyo")
    assert repo.ask(fact.prompt, max_new_tokens=6).text.strip().startswith("Tokyo")
    changes = repo.diff("HEAD~1", "HEAD")
    assert [(c.prompt, c.before, c.after) for c in changes.overwritten] == [(fact.prompt, fact.target, "Tokyo")]
    assert len(changes.experts_added) == 1 and changes.bytes_delta > 0


def test_diff_lists_added_facts_and_behavior(repo):
    third, second, _ = [cid for cid, _ in repo.log()]
    result = repo.diff(second, third, behavior=True, max_new_tokens=4)
    assert sorted(c.prompt for c in result.added) == sorted(_batch_facts(repo, third))
    assert not result.removed and not result.overwritten
    edited = {b.prompt for b in result.behavior if b.kind == "edit"}
    assert edited == set(_batch_facts(repo, third))


def test_branches_and_tags_from_the_cli(repo):
    store = ["--store", str(repo.store.root)]
    assert runner.invoke(app, ["branch", "experiment", "HEAD~1", *store]).exit_code == 0
    assert runner.invoke(app, ["tag", "v1", *store]).exit_code == 0
    listed = json.loads(runner.invoke(app, ["branch", "--json", *store]).stdout)
    assert listed["current"] == "main" and set(listed["branches"]) == {"main", "experiment"}
    assert json.loads(runner.invoke(app, ["tag", "-l", "--json", *store]).stdout) == {"v1": repo.store.resolve("HEAD")}
    assert repo.store.resolve("v1") == repo.store.resolve("main")
    bad = runner.invoke(app, ["branch", "../escape", *store])
    assert bad.exit_code == 1 and "invalid branch name" in bad.output
    assert runner.invoke(app, ["branch", "-d", "main", *store]).exit_code == 1
    assert runner.invoke(app, ["branch", "-d", "experiment", *store]).exit_code == 0


def test_fsck_and_gc(repo):
    report = fsck(repo.store)
    assert report.ok and report.commits == 3 and report.objects == 12 + 3  # and one tree page per version
    orphan = repo.store.objects.put(b"not referenced by anything")
    assert gc(repo.store).unreachable == [orphan]
    assert orphan in repo.store.objects  # dry run by default
    assert gc(repo.store, prune=True).unreachable == [orphan]
    assert orphan not in repo.store.objects and fsck(repo.store).ok

    facts_object = repo.store.read_commit(repo.log()[0][0]).expert.facts
    path = repo.store.objects.path(facts_object)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes().replace(b"Madrid", b"Madrix").replace(b"Finnish", b"Finnisx"))
    result = runner.invoke(app, ["fsck", "--store", str(repo.store.root)])
    assert result.exit_code == 1 and facts_object in result.stdout


def test_ask_explains_the_routing_decision_it_made(tmp_path, tiny_llama_dir):
    """The explanation comes from the route itself: routed, below the threshold, or an anchor whose subject
    the prompt does not name (then no similarity can route it, and `ask` says so, not "below tau")."""
    repo = Repo.init(tmp_path / "work", model=str(tiny_llama_dir), **{**EDIT, "threshold": 0.5,
                                                                       "subject_threshold": 0.5})
    repo.commit([Fact(prompt="The official language of Orvania is", target="Finnish", subject="Orvania")])
    store = ["--store", str(repo.store.root)]
    routed = runner.invoke(app, ["ask", "The official language of Orvania is", *store, "--max-new-tokens", "2"])
    assert routed.exit_code == 0 and "routed to expert 0 of commit" in routed.output
    neighbour = runner.invoke(app, ["ask", "The official language of Kestria is", *store, "--json"])
    answer = json.loads(neighbour.output)
    assert answer["expert"] is None and answer["threshold"] is None and answer["similarity"] > 0.5
    text = runner.invoke(app, ["ask", "The official language of Kestria is", *store]).output
    assert "names a subject this prompt does not contain" in text and "<" not in text


def test_eval_generate_prints_both_protocols_and_real_answers(repo):
    store = ["--store", str(repo.store.root)]
    result = runner.invoke(app, ["eval", "--generate", "--json", "--samples", "1", *store])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    keys = ("rel", "gen", "loc", "wild_rel", "wild_gen", "wild_loc", "fluency", "base_fluency", "degenerate",
            "base_degenerate", "ppl", "base_ppl")
    assert all(isinstance(scores[k], float) for k in keys)
    assert scores["ppl"] < scores["base_ppl"]  # the committed targets became likelier
    assert scores["portability"] is None  # these facts carry no portability questions
    assert scores["wild_loc"] == 1.0  # the locality prompts route to no expert: answers identical to base
    assert {s["kind"] for s in scores["samples"]} == {"edit", "rephrase", "locality"}
    table = runner.invoke(app, ["eval", "--generate", "--samples", "1", *store]).output
    assert "WILD Rel" in table and "continues:" in table and "base:" in table and "PPL" in table
