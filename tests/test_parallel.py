"""Training a commit's batches at once (local workers, Ray) gives the history training them in turn gives."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_facts
from lemoe_store import Repo
from lemoe_store.cli import app
from lemoe_store.parallel import WorkerError
from lemoe_store.stores.maintenance import fsck

EDIT = dict(layer=2, rank=16, lr=2e-2, max_steps=80, batch_size=4, plan="original")


@pytest.fixture(scope="module")
def in_turn(tmp_path_factory, tiny_llama_dir) -> Repo:
    repo = Repo.init(tmp_path_factory.mktemp("in-turn") / "work", model=str(tiny_llama_dir), **EDIT)
    repo.commit(tiny_facts()[:4], message="first")  # a parent with an expert, so workers route past it
    repo.commit(tiny_facts()[4:], message="batches")
    return repo


def _same_history(repo: Repo, reference: Repo) -> None:
    ours, theirs = repo.experts_at(repo.resolve("HEAD")), reference.experts_at(reference.resolve("HEAD"))
    assert len(ours) == len(theirs) == 3
    assert [c.subject for _, c in repo.log()] == [c.subject for _, c in reference.log()]
    for a, b in zip(ours, theirs):
        assert a.anchor_facts == b.anchor_facts and a.anchor_spans == b.anchor_spans
        assert a.anchor_subjects == b.anchor_subjects
        assert torch.allclose(a.anchors, b.anchors, atol=1e-5)
        for name in a.weights:
            assert torch.allclose(a.weights[name], b.weights[name], atol=2e-3), name
    for (_, a), (_, b) in zip(repo.log(), reference.log()):
        assert a.metrics["rel"] == b.metrics["rel"] == 1.0
    assert repo.evaluate(tiny_facts()).rel == 1.0


def _parent_only(tmp_path, tiny_llama_dir) -> Repo:
    repo = Repo.init(tmp_path / "work", model=str(tiny_llama_dir), **EDIT)
    repo.commit(tiny_facts()[:4], message="first")
    return repo


def test_two_local_workers_give_the_history_of_training_in_turn(in_turn, tmp_path, tiny_llama_dir):
    repo = _parent_only(tmp_path, tiny_llama_dir)
    facts = tmp_path / "more.jsonl"
    facts.write_text("".join(json.dumps(f.to_record()) + "\n" for f in tiny_facts()[4:]))
    result = CliRunner().invoke(app, ["commit", str(facts), "-m", "batches", "--workers", "2", "--store", str(repo.path)])
    assert result.exit_code == 0, result.output
    assert not result.stderr.startswith("\n")  # not a terminal: no progress bar, and no blank line left of it
    _same_history(repo, in_turn)


def test_a_local_ray_cluster_gives_the_history_of_training_in_turn(in_turn, tmp_path, tiny_llama_dir):
    ray = pytest.importorskip("ray")
    repo = _parent_only(tmp_path, tiny_llama_dir)
    try:
        repo.commit(tiny_facts()[4:], message="batches", ray="local", workers=2)
    finally:
        ray.shutdown()
    _same_history(repo, in_turn)


def test_a_worker_that_keeps_dying_leaves_only_whole_commits(tmp_path, tiny_llama_dir, monkeypatch):
    repo = _parent_only(tmp_path, tiny_llama_dir)
    head = repo.resolve("HEAD")
    monkeypatch.setenv("LEMOE_TEST_KILL_BATCH", "1")  # the second batch's worker exits, both times
    with pytest.raises(WorkerError, match="batch 2 of 2"):
        repo.commit(tiny_facts()[4:], message="batches", workers=2)
    log = repo.log()
    assert len(log) == 2 and log[1][0] == head and log[0][1].subject == "batches [1/2]"
    assert fsck(repo.store).ok and not repo.store.temp_files()


def test_replay_on_workers_gives_the_replay_in_turn(in_turn):
    in_turn.replay("replay-in-turn", plan="random", seed=1)
    in_turn.replay("replay-workers", plan="random", seed=1, workers=2)
    ours, theirs = in_turn.experts_at(in_turn.resolve("replay-workers")), in_turn.experts_at(in_turn.resolve("replay-in-turn"))
    assert [a.anchor_facts for a in ours] == [b.anchor_facts for b in theirs] and len(ours) == 3
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.anchors, b.anchors, atol=1e-5)
        assert all(torch.allclose(a.weights[k].float(), b.weights[k].float(), atol=2e-3) for k in a.weights)
    assert in_turn.resolve("HEAD") == in_turn.resolve("main")  # replay leaves HEAD where it was
