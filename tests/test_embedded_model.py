"""The embedded SmolLM2-135M model, end to end (slow: converts the GGUF once, trains real experts)."""

from __future__ import annotations

from importlib import resources

import pytest

from lemoe_store.models import embedded_model_dir, load_model
from lemoe_store.repo import Repo
from lemoe_store.schemas.facts import load_facts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lemoe-cache")


@pytest.fixture(autouse=True)
def _shared_cache(embedded_cache, monkeypatch):
    monkeypatch.setenv("LEMOE_CACHE", str(embedded_cache))


def test_embedded_model_answers_for_real():
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert (embedded_model_dir() / "model.safetensors").is_file()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


def test_edit_then_checkout_restores_the_old_answer(tmp_path):
    repo = Repo.init(tmp_path / "store", batch_size=6)
    with resources.as_file(resources.files("lemoe_store").joinpath("samples/facts.jsonl")) as path:
        facts = load_facts(path)
    before = {f.prompt: repo.ask(f.prompt, max_new_tokens=4).text for f in facts}
    first, second = repo.commit(facts, message="samples")
    newest = repo.show("HEAD").facts
    for record in newest:
        answer = repo.ask(record.prompt, max_new_tokens=8)
        assert answer.text.strip().startswith(record.target), answer
        assert answer.commit == second
    repo.checkout("HEAD~1")
    restored = []
    for record in newest:
        answer = repo.ask(record.prompt, max_new_tokens=4)
        assert answer.commit != second  # that commit's expert is gone
        if answer.expert is None:  # routed to no expert: the base model's answer, exactly
            assert answer.text == before[record.prompt]
            restored.append(record.id)
    # The samples come in same-template pairs ("The chief executive of Acme Robotics / Zentra Bank is");
    # when a pair is split across the two commits, the remaining twin's anchor can still catch its prompt.
    assert len(restored) >= len(newest) - 2, restored
    scores = repo.evaluate(rev="main")
    assert scores.rel >= 0.95
