"""The benchmark's peer editors on a tiny model: each one really edits, and leaves the model as it found it."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from typer.testing import CliRunner

from conftest import CORPUS, tiny_facts
from lemoe_store.bench import METHODS, TITLES, BenchSettings, run_grid, save
from lemoe_store.bench.runner import irrelevant_pool, make_method
from lemoe_store.bench.wise import MAIN, ties_merge
from lemoe_store.cli import app
from lemoe_store.editing import evaluate
from lemoe_store.editing.batching import encode_pair, encode_prompt
from lemoe_store.errors import BenchError
from lemoe_store.models import load_model

SETTINGS = BenchSettings(layer=2, max_steps=80)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


def _logits(model, tokenizer, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([encode_prompt(tokenizer, prompt)])).logits


def test_every_method_has_the_title_its_rows_carry():
    assert set(METHODS) == set(TITLES)
    assert TITLES["lemoe-anchors"] == "LEMoE with per-fact anchor routing (ours)"
    assert TITLES["lemoe-paper"] == "LEMoE (paper routing)"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_edits_and_leaves_the_model_as_it_was(tiny, name):
    model, tokenizer = tiny
    # WISE writes every edit into one side memory; in a 64-wide random model the edits overwrite each other
    # (8 in turn keep Rel ~0.2 even at lr 10), so it is checked on 2 (SmolLM2's figures: benchmarks/README).
    facts = tiny_facts()[: 2 if name.startswith("wise") else 8]
    probe = "0 1 2 3 4 5 6 7 8"
    before = _logits(model, tokenizer, probe)
    base_rel = evaluate(model, tokenizer, facts).rel
    method = make_method(name, model, tokenizer, SETTINGS, irrelevant_pool(tokenizer, tiny_facts()[8:]))
    if name == "ft-l":  # a random tiny model needs a far looser constraint than SmolLM2 (see the next test)
        method.lr, method.eps = 1e-2, 1.0
    if name in ("wise", "wise-retrieve", "memoir"):  # ... and a larger step than lr 1.0, which (WISE's 70 steps, MEMOIR's 30 with
        method.lr = 10.0            # the gradient clipped to norm 1) does not move its flat logits enough
    for batch in method.order(facts, 4):
        method.edit(batch)
    edited = evaluate(method.model_for_eval(), tokenizer, facts)
    method.close()
    assert edited.rel > base_rel + 0.3, (name, base_rel, edited)
    assert torch.equal(_logits(model, tokenizer, probe), before)  # closed: the base model again


def test_ft_l_keeps_the_weight_change_within_its_norm_constraint(tiny):
    model, tokenizer = tiny
    method = make_method("ft-l", model, tokenizer, SETTINGS, [])
    method.edit(tiny_facts()[:4])
    change = (method.weight - method.original).abs().max()
    assert 0 < change <= method.eps + 1e-7
    method.close()
    assert torch.equal(method.weight, method.original)


def test_grace_and_lemoe_leave_unrelated_prompts_bit_identical(tiny):
    model, tokenizer = tiny
    probe = "the quick brown fox jumps over the lazy dog 0 1 2 3"
    before = _logits(model, tokenizer, probe)
    for name in ("grace", "lemoe-anchors"):
        method = make_method(name, model, tokenizer, SETTINGS, [])
        method.edit(tiny_facts()[:4])
        assert torch.equal(_logits(method.model_for_eval(), tokenizer, probe), before), name
        method.close()


@pytest.mark.parametrize("name", ["moe", "lemoe-learned-router"])
def test_learned_router_variants_route_on_lemoes_keys(tiny, name):
    """The ablations against LEMoE change the router only: their keys are LEMoE's anchors' keys."""
    model, tokenizer = tiny
    prompts = [f.prompt for f in tiny_facts()[:4]]
    lemoe = make_method("lemoe-anchors", model, tokenizer, SETTINGS, [])
    expected = lemoe.editor.keys(prompts)
    lemoe.close()
    method = make_method(name, model, tokenizer, SETTINGS, [])
    method.edit(tiny_facts()[:4])
    for prompt, key in zip(prompts, expected):
        method.model_for_eval()(input_ids=torch.tensor([encode_prompt(tokenizer, prompt)]))
        assert torch.allclose(method.adaptor.last_keys[0], key, atol=1e-5), prompt
    method.close()


def test_memoir_reads_its_memory_only_for_prompts_whose_mask_overlaps_an_edit(tiny):
    model, tokenizer = tiny
    facts = tiny_facts()
    probe = "the quick brown fox jumps over the lazy dog 0 1 2 3"
    before = _logits(model, tokenizer, probe)
    background = [encode_pair(tokenizer, text[:40], "x") for text in CORPUS]
    method = make_method("memoir", model, tokenizer, SETTINGS, background)
    method.edit(facts[:4])
    memory = method.memory
    assert memory.residual.abs().sum() > 0 and len(memory.edit_masks) == 4
    assert int(memory.edit_masks[0].sum()) == memory.k  # each edit writes through exactly k columns
    # A random 128-wide model's masks overlap far more than a trained model's (unrelated prompts ~0.45 here),
    # so the threshold is set between what this model gives unrelated prompts and rephrases.
    memory.threshold = 0.6

    after = _logits(method.model_for_eval(), tokenizer, probe)
    assert float(memory.last_overlaps[0]) < memory.threshold
    assert torch.equal(after, before)
    rephrase = facts[0].rephrases[0]
    with memory.bypassed():
        base_rephrase = _logits(model, tokenizer, rephrase)
    edited_rephrase = _logits(model, tokenizer, rephrase)
    assert float(memory.last_overlaps[0]) >= memory.threshold and not torch.equal(edited_rephrase, base_rephrase)
    matched = int(memory.last_matches[0])
    assert torch.equal(memory._reading[0][0], memory.edit_masks[matched])  # read through the matched edit's mask

    # TopHash keeps the k features largest in magnitude: a strongly negative one is among them
    features = torch.zeros(1, 1, memory.background.numel())
    features[0, 0, :memory.k] = 1.0
    features[0, 0, -1] = -5.0
    mask = memory.masks(features + memory.background, torch.ones(1, 1))
    assert bool(mask[0, memory.permutation[-1]]) and int(mask.sum()) == memory.k
    method.close()


def test_wise_merges_its_shards_by_ties_relative_to_w_as_computed_by_hand(tiny):
    W = torch.tensor([[10.0, 10.0], [10.0, 10.0]])
    shard_1 = W + torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # trimmed to density 0.5: -2 and 3 stay
    shard_2 = W + torch.tensor([[3.0, 1.0], [-5.0, 0.2]])  # 3 and -5 stay
    # weights 1/2 each; elected signs (+, -, -, +); each kept entry is the only one agreeing, so the
    # weighted sum divided by its weight gives it back whole.
    merged = ties_merge([shard_1 - W, shard_2 - W], [0.5, 0.5], density=0.5)
    assert torch.equal(W + merged, torch.tensor([[13.0, 8.0], [5.0, 13.0]]))

    model, tokenizer = tiny  # the method merges its saved shards the same way, and mixes an earlier merge in at 0.6
    method = make_method("wise", model, tokenizer, SETTINGS, [])
    memory = method.memory
    first = torch.randn_like(memory.current)
    second = torch.randn_like(memory.current)
    memory.saved = [first.clone(), second.clone()]
    method._merge()
    assert torch.equal(memory.merged, ties_merge([first, second], [0.5, 0.5])) and memory.saved == []
    third = torch.randn_like(memory.current)
    earlier = memory.merged.clone()
    memory.saved = [third]
    method._merge()
    assert torch.equal(memory.merged, ties_merge([third, earlier], [0.4, 0.6]))
    method.close()


def test_wise_merges_the_shard_its_last_edit_saved_before_scoring(tiny, monkeypatch):
    """At T = save_freq the last edit saves W' as a shard and empties it; the reference's final merge still
    merges that shard, or the edits would be read from nowhere."""
    from lemoe_store.bench import wise

    monkeypatch.setattr(wise, "SAVE_FREQ", 2)
    monkeypatch.setattr(wise, "MERGE_FREQ", 4)
    model, tokenizer = tiny
    method = make_method("wise", model, tokenizer, SETTINGS, irrelevant_pool(tokenizer, tiny_facts()[8:]))
    method.edit(tiny_facts()[:2])
    memory = method.memory
    (shard,) = memory.saved
    assert not memory.current.any() and not memory.merged.any()
    method.model_for_eval()
    assert memory.saved == [] and torch.equal(memory.merged, ties_merge([shard], [1.0])) and memory.merged.any()
    method.close()


def test_wise_retrieve_keeps_each_shard_apart_and_routes_as_the_reference(tiny):
    model, tokenizer = tiny
    method = make_method("wise-retrieve", model, tokenizer, SETTINGS, [])
    memory = method.memory
    one_copy = memory.current.numel() * 4  # W' and each saved memory are copies of the layer's weight
    assert method.bytes_added == one_copy
    shards = [torch.randn_like(memory.current) for _ in range(2)]
    for shard, distance in zip(shards, (30.0, 20.0)):  # two shards of edits, saved in turn
        with torch.no_grad():
            memory.current.copy_(shard)
        memory.smallest_edit_distance = distance
        method._save_shard()
    assert [torch.equal(kept, shard) for kept, shard in zip(memory.memories, shards)] == [True, True]
    assert memory.memory_distances == [30.0, 20.0] and memory.smallest_edit_distance == float("inf")
    assert not memory.current.any() and method.bytes_added == 3 * one_copy
    # thresholds (act_ratio 0.88): W' 8.8 (its shard's edits had d 10), memory 1 26.4, memory 2 17.6
    memory.smallest_edit_distance = 10.0
    gaps = torch.tensor([[9.0, 9.0, 30.0, 9.0, 9.0],    # d of W'
                         [27.0, 20.0, 40.0, 8.0, 27.0],  # d of memory 1
                         [1.0, 1.0, 1.0, 19.0, 30.0]])   # d of memory 2
    # 0: memory 1, past its threshold; 1: W' (9 >= 8.8), memory 1 under its threshold; 2: memory 1 beyond W''s
    # d; 3: memory 2; 4: both memories past their thresholds, the larger d wins
    assert memory.route(gaps).tolist() == [1, 0, 1, 2, 2]
    # the reference's order: a memory past its own threshold (4 > 0.88 × 4) but not beyond W''s d (5) is not
    # read, even though W' itself stays under its threshold (5 < 8.8): the main memory answers
    unread = torch.tensor([[5.0], [4.0], [1.0]])
    memory.memory_distances = [4.0, 20.0]
    assert memory.route(unread).tolist() == [MAIN]
    # every 1,000 edits the last two memories become their TIES merge relative to W, with the smaller threshold
    memory.memory_distances = [30.0, 20.0]
    method._merge()
    assert len(memory.memories) == 1 and torch.equal(memory.memories[0], ties_merge(shards, [0.5, 0.5]))
    assert memory.memory_distances == [20.0] and method.bytes_added == 2 * one_copy
    method.close()


def test_run_grid_writes_results_and_plot(tiny, tmp_path):
    model, tokenizer = tiny
    facts = tiny_facts()
    results = run_grid("lifelong", model, tokenizer, facts[:8], ["lemoe-anchors", "ft-l"], [4, 8], 4, SETTINGS,
                       irrelevant_pool(tokenizer, facts[8:]), protocol="both")
    # smallest T first: a grid stopped early holds every method's small cells
    assert [(r.method, r.T) for r in results] == [("lemoe-anchors", 4), ("ft-l", 4), ("lemoe-anchors", 8),
                                                  ("ft-l", 8)]
    # Both protocols in every row, each scored against the base model's generations taken before any edit
    # (FT-L changes the weights themselves, so "base" cannot be read from the model afterwards).
    assert all(r.wild_rel is not None and r.fluency is not None for r in results)
    assert results[2].base_fluency == results[3].base_fluency and results[2].wild_loc == 1.0
    json_path, png_path = save(results, tmp_path, {"mode": "lifelong", "data": "tiny"})
    assert json.loads(json_path.read_text())["results"][2]["T"] == 8
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_writes_a_table_results_and_plot(tiny_llama_dir, facts_file, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", "lifelong", "--methods", "grace,lemoe-anchors", "--T", "2,4", "--data", str(facts_file),
        "--irrelevant", str(facts_file), "--model", str(tiny_llama_dir), "--layer", "2", "--out", str(out),
        "--protocol", "both"])
    assert result.exit_code == 0, result.output
    # each row under its method's name; piped (no terminal), the table keeps its natural width, every cell whole
    assert "| GRACE " in result.output.replace("│", "|")
    assert "LEMoE with per-fact anchor routing (ours)" in result.output
    assert "PPL (base)" in result.output and "degenerate (base)" in result.output and "bytes/edit" in result.output
    saved = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["T"]) for r in saved["results"]] == [("grace", 2), ("lemoe-anchors", 2), ("grace", 4),
                                                                 ("lemoe-anchors", 4)]
    assert (out / "results.png").stat().st_size > 1000
    # every setting each method ran with: the shared ones and its own
    assert saved["settings"]["grace"] == {"layer": 2, "max_steps": 40, "loss_floor": 0.1, "seed": 0, "lr": 1.0,
                                          "eps_init": 3.0, "optimizer": "adam"}
    lemoe = saved["settings"]["lemoe-anchors"]
    assert lemoe["layer"] == 2 and lemoe["continuation_tokens"] == 1 and lemoe["anchor_rephrases"] is False


def test_cli_bench_resumes_a_grid_from_the_same_commit_and_refuses_any_other(tiny_llama_dir, facts_file, tmp_path,
                                                                              monkeypatch):
    from lemoe_store.bench import runner

    monkeypatch.setattr(runner, "code_version", lambda: "1234abcd")
    out = tmp_path / "bench"
    common = ["bench", "lifelong", "--methods", "grace", "--data", str(facts_file), "--irrelevant", str(facts_file),
              "--model", str(tiny_llama_dir), "--out", str(out)]
    first = CliRunner().invoke(app, [*common, "--layer", "2", "--T", "2"])
    assert first.exit_code == 0, first.output
    (kept,) = json.loads((out / "results.json").read_text())["results"]

    resumed = CliRunner().invoke(app, [*common, "--layer", "2", "--T", "2,4", "--methods", "grace,ft-l", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    saved = json.loads((out / "results.json").read_text())
    # the T = 2 GRACE cell is kept as it was (its timing too: it did not run again); the others ran
    assert saved["results"][0] == kept
    assert [(r["method"], r["T"]) for r in saved["results"]] == [("grace", 2), ("ft-l", 2), ("grace", 4), ("ft-l", 4)]
    assert set(saved["settings"]) == {"grace", "ft-l"} and saved["commit"] == "1234abcd"

    before = (out / "results.json").read_bytes()
    other_layer = CliRunner().invoke(app, [*common, "--layer", "3", "--T", "2", "--resume"])
    assert other_layer.exit_code == 2 and "was made with layer = 2, this run has 3" in other_layer.output
    monkeypatch.setattr(runner, "code_version", lambda: "5678ef00")
    other_commit = CliRunner().invoke(app, [*common, "--layer", "2", "--T", "2", "--resume"])
    assert other_commit.exit_code == 2 and "commit = '1234abcd'" in other_commit.output
    monkeypatch.setattr(runner, "code_version", lambda: "1234abcd+dirty")
    dirty = CliRunner().invoke(app, [*common, "--layer", "2", "--T", "2", "--resume"])
    assert dirty.exit_code == 2 and "uncommitted changes" in dirty.output
    assert (out / "results.json").read_bytes() == before  # refused runs leave the results as they were


@pytest.mark.parametrize("name", ["memoir", "wise", "wise-retrieve"])
def test_a_long_cell_stopped_midway_goes_on_from_its_checkpoint_to_the_same_scores(tiny, tmp_path, monkeypatch, name):
    from lemoe_store.bench import runner, wise

    monkeypatch.setattr(wise, "SAVE_FREQ", 1)  # WISE saves a shard after every edit and merges every two,
    monkeypatch.setattr(wise, "MERGE_FREQ", 2)  # so the checkpoints hold saved and merged memories

    model, tokenizer = tiny
    facts = tiny_facts()[:4]
    irrelevant = irrelevant_pool(tokenizer, tiny_facts()[8:])
    monkeypatch.setattr(runner, "code_version", lambda: "1234abcd")
    monkeypatch.setattr(runner, "CHECKPOINT_SECONDS", 0.0)  # save after every batch
    cell = ("lifelong", name, model, tokenizer, facts, 1, SETTINGS, irrelevant, [[1]] * 4, [1.0] * 4)
    whole = runner.run_one(*cell)

    checkpoint = tmp_path / f"{name}.safetensors"
    method_class = runner.METHODS[name]
    edit, calls = method_class.edit, []

    def stopped_after_two(self, batch):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the session ends mid-cell
        calls.append(batch)
        edit(self, batch)

    monkeypatch.setattr(method_class, "edit", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        runner.run_one(*cell, checkpoint=checkpoint)
    monkeypatch.setattr(method_class, "edit", edit)
    assert checkpoint.exists()
    edited: list = []
    monkeypatch.setattr(method_class, "edit", lambda self, batch: (edited.append(batch), edit(self, batch)))
    resumed = runner.run_one(*cell, checkpoint=checkpoint)
    assert len(edited) == 2 and not checkpoint.exists()  # only the last two batches ran; the checkpoint went
    timing = ("seconds", "s_per_edit")
    assert {k: v for k, v in asdict(resumed).items() if k not in timing} == \
        {k: v for k, v in asdict(whole).items() if k not in timing}

    monkeypatch.setattr(method_class, "edit", stopped_after_two)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        runner.run_one(*cell, checkpoint=checkpoint)
    monkeypatch.setattr(method_class, "edit", edit)
    monkeypatch.setattr(runner, "code_version", lambda: "5678ef00")  # other code: its checkpoint is refused
    with pytest.raises(BenchError, match="delete it to start the cell over"):
        runner.run_one(*cell, checkpoint=checkpoint)


def test_cli_bench_takes_a_slice_of_the_records(tiny_llama_dir, facts_file, tmp_path):
    out = tmp_path / "bench"
    common = ["bench", "lifelong", "--methods", "grace", "--data", str(facts_file), "--irrelevant", str(facts_file),
              "--model", str(tiny_llama_dir), "--layer", "2", "--out", str(out)]
    result = CliRunner().invoke(app, [*common, "--records", "2:5", "--T", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["records"] == "2:5"
    too_many = CliRunner().invoke(app, [*common, "--records", "2:5", "--T", "4"])
    assert too_many.exit_code == 2 and "--T 4 is more than the 3 facts" in too_many.output
    bad = CliRunner().invoke(app, [*common, "--records", "two:5"])
    assert bad.exit_code == 2 and "--records takes START:END" in bad.output


def test_long_form_rows_report_the_targets_perplexity_beside_the_base_models(tiny):
    """PPL = exp(mean NLL of the target's tokens after the prompt), averaged over facts; editing lowers it."""
    model, tokenizer = tiny
    facts = tiny_facts()[:4]
    expected_base = []
    with torch.no_grad():
        for fact in facts:
            pair = encode_pair(tokenizer, fact.prompt, fact.target)
            logits = model(input_ids=torch.tensor([pair.prompt + pair.answer])).logits[0]
            answer_logits = logits[len(pair.prompt) - 1 : -1]
            expected_base.append(torch.nn.functional.cross_entropy(answer_logits, torch.tensor(pair.answer)).exp())
    (row,) = run_grid("lifelong", model, tokenizer, facts, ["lemoe-anchors"], [4], 4, SETTINGS, [])
    assert row.base_ppl == pytest.approx(float(torch.stack(expected_base).mean()), rel=1e-3)
    assert row.ppl < row.base_ppl / 2


def test_grid_cells_fanned_out_to_worker_processes_score_as_in_turn(tiny, tiny_llama_dir):
    from lemoe_store.parallel import LocalWorkers

    model, tokenizer = tiny
    facts = tiny_facts()
    grid = ("lifelong", model, tokenizer, facts[:6], ["lemoe-anchors", "grace"], [3, 6], 3, SETTINGS,
            irrelevant_pool(tokenizer, facts[8:]))
    started: list[tuple[str, int]] = []
    in_turn = run_grid(*grid, protocol="both")
    fanned = run_grid(*grid, protocol="both", workers=LocalWorkers(2), model_name=str(tiny_llama_dir),
                      on_start=lambda name, size: started.append((name, size)))
    assert sorted(started) == [("grace", 3), ("grace", 6), ("lemoe-anchors", 3), ("lemoe-anchors", 6)]

    def scores(result) -> dict:
        return {k: v for k, v in asdict(result).items() if k not in ("seconds", "s_per_edit")}

    assert [scores(r) for r in fanned] == [scores(r) for r in in_turn]  # grid order, the same scores
