"""The LEMoE engine on tiny random models: exactness, freezing, routing consistency, planning."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import tiny_facts
from lemoe_store.editing import EditConfig, Editor, attach, detach, evaluate, find_adaptor, plan
from lemoe_store.editing.adaptor import KEY_READERS, RoutingDecision, compact_key_readers, restore_key_readers
from lemoe_store.editing.batching import encode_pair, encode_prompt, greedy_continuations, teacher_forced_predictions
from lemoe_store.editing.routing import NO_EXPERT
from lemoe_store.editing.wild import greedy_texts
from lemoe_store.models import load_model
from lemoe_store.schemas.facts import Fact, Locality

CONFIG = dict(layer=2, rank=16, threshold=0.9, lr=2e-2, max_steps=80, anchor_rephrases=False)


def _logits(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


def test_untrained_expert_changes_nothing(llama):
    model, tokenizer = llama
    facts = tiny_facts()[:4]
    before = [_logits(model, tokenizer, f.prompt) for f in facts]
    editor = Editor(model, tokenizer, EditConfig(**CONFIG))
    keys = editor.keys([f.prompt for f in facts])
    editor.adaptor.add_expert(rank=16)
    editor.adaptor.add_anchors(keys, 0, [f.id for f in facts])
    for fact, reference in zip(facts, before):
        after = _logits(model, tokenizer, fact.prompt)
        assert editor.adaptor.last_routes[0].expert == 0  # really routed, and still identical
        assert torch.equal(after, reference)


def test_edit_makes_targets_argmax_and_leaves_unrelated_prompts_exact(llama):
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    unrelated = "What is the name of the last episode?"
    base_unrelated = _logits(model, tokenizer, unrelated)
    pairs = [encode_pair(tokenizer, f.prompt, f.target) for f in facts]
    assert teacher_forced_predictions(model, tokenizer, pairs) != [p.answer for p in pairs]

    editor = Editor(model, tokenizer, EditConfig(**CONFIG))
    artifact = editor.edit(facts)

    assert teacher_forced_predictions(model, tokenizer, pairs) == [p.answer for p in pairs]
    assert artifact.stats["edit_prompts_routed_to_expert"] == len(facts)
    after_unrelated = _logits(model, tokenizer, unrelated)
    assert editor.adaptor.last_routes[0].expert == NO_EXPERT
    assert torch.equal(after_unrelated, base_unrelated)
    assert evaluate(model, tokenizer, facts).rel == 1.0


def test_rephrases_are_learnt_and_routed_neighbours_keep_base_answers(llama):
    model, tokenizer = llama
    neighbour = "The capital of Zentra is"
    facts = [Fact(prompt="The capital of Acme is", target="Rome", rephrases=("Acme's capital is",),
                  locality=(Locality(neighbour, "Madrid"),))]
    # A low threshold makes the neighbour route to the new expert, as near-duplicate prompts do.
    editor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "anchor_rephrases": True, "threshold": 0.3}))
    artifact = editor.edit(facts)
    assert artifact.stats["prompts_trained"] == 3
    assert artifact.stats["locality_prompts_guarded"] == 1  # the neighbour routes to the new expert...
    assert len(artifact.anchor_facts) == 2  # ...but is not an anchor
    scores = evaluate(model, tokenizer, facts)
    assert (scores.rel, scores.gen, scores.loc) == (1.0, 1.0, 1.0)  # ...and keeps its base predictions


def test_earlier_experts_are_frozen_bit_for_bit(llama):
    model, tokenizer = llama
    facts = tiny_facts()
    editor = Editor(model, tokenizer, EditConfig(**CONFIG))
    first = editor.edit(facts[:6])
    snapshot = {k: v.clone() for k, v in editor.adaptor.experts[0].state_dict().items()}
    editor.edit(facts[6:])
    stored = restore_key_readers(first.weights, first.anchors)
    for name, tensor in editor.adaptor.experts[0].state_dict().items():
        assert torch.equal(tensor, snapshot[name])
        assert torch.equal(tensor, stored[name])
    assert not any(p.requires_grad for p in editor.adaptor.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_routing_is_the_same_in_full_forward_and_cached_generation(llama):
    model, tokenizer = llama
    facts = tiny_facts()
    # Long enough that the random tiny model learns every answer ("27 27 26" is the slowest).
    editor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "max_steps": 200}))
    editor.edit(facts[:6])
    editor.edit(facts[6:])
    adaptor = find_adaptor(model)
    for index, fact in enumerate(facts):
        own = 0 if index < 6 else 1
        prompt = encode_prompt(tokenizer, fact.prompt)
        answer = encode_pair(tokenizer, fact.prompt, fact.target).answer
        ids = torch.tensor([prompt])
        with torch.no_grad():
            model(input_ids=ids)
        assert adaptor.last_routes[0].expert == own
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer),
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert adaptor.last_routes[0].expert == own
        # The same greedy tokens from full forwards without a cache, routed on the prompt alone.
        sequence = list(prompt)
        for _ in range(len(answer)):
            full = torch.tensor([sequence])
            with torch.no_grad(), adaptor.teacher_forcing(torch.tensor([len(prompt)])):
                sequence.append(int(model(input_ids=full).logits[0, -1].argmax()))
        assert generated == sequence[len(prompt):]
        assert generated == answer


def test_a_routed_query_reads_the_key_of_the_anchor_it_matched(llama):
    """Experts are trained on their anchors' keys, so a rephrase hands its expert the matched anchor's key
    (the one its fact was trained with), not its own."""
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    editor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "threshold": 0.5}))
    editor.edit(facts)
    adaptor = editor.adaptor
    rephrase = facts[0].rephrases[0]
    routed = _logits(model, tokenizer, rephrase)
    route = adaptor.last_routes[0]
    assert route.expert == 0 and route.similarity < 0.999
    matched_fact = next(f for f in facts if f.id == adaptor.anchor_facts[route.anchor])
    prompt_length = len(encode_prompt(tokenizer, rephrase))

    def forced_logits(key: torch.Tensor) -> torch.Tensor:
        decision = RoutingDecision(torch.tensor([0]), torch.tensor([prompt_length - 1]), keys=key)
        with adaptor.forced(decision):
            return _logits(model, tokenizer, rephrase)

    assert torch.allclose(forced_logits(editor.keys([matched_fact.prompt])), routed, atol=1e-6)
    assert not torch.allclose(forced_logits(editor.keys([rephrase])), routed, atol=1e-4)


def test_the_matched_key_alone_carries_part_of_the_facts_push_at_the_first_answer_position(llama):
    """A rephrase's own hidden state differs from its fact's prompt; the value read from the matched
    anchor's key gives it the push that belongs to the fact whatever that state is, where the answer's
    first token is predicted (and only there)."""
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    editor = Editor(model, tokenizer, EditConfig(**CONFIG))
    editor.edit(facts)
    expert = editor.adaptor.experts[0]
    keys = editor.keys([f.prompt for f in facts])
    blank = torch.zeros(len(facts), 2, editor.adaptor.hidden)
    first = torch.tensor([[True, False]] * len(facts))
    with torch.no_grad():
        pushed = expert(blank, keys, first)
        assert pushed[:, 0].abs().amax() > 1e-3
        assert torch.equal(pushed[:, 1], torch.zeros_like(pushed[:, 1]))  # later positions: x's part alone
        expert.value.weight.zero_()  # without the value, a blank state gets no push at all
        assert torch.equal(expert(blank, keys, first), torch.zeros_like(pushed))


def test_works_on_gpt2_layout(tiny_gpt2_dir):
    model, tokenizer = load_model(str(tiny_gpt2_dir), device="cpu")
    facts = tiny_facts()[:4]
    Editor(model, tokenizer, EditConfig(**{**CONFIG, "layer": 1}))
    editor = find_adaptor(model)
    assert type(editor.base).__name__ == "GPT2MLP"
    Editor(model, tokenizer, EditConfig(**{**CONFIG, "layer": 1})).edit(facts)
    assert evaluate(model, tokenizer, facts).rel == 1.0
    detach(model)
    assert find_adaptor(model) is None


def test_attach_restores_a_version_from_artifacts(llama):
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    config = EditConfig(**CONFIG)
    artifact = Editor(model, tokenizer, config).edit(facts)
    edited = _logits(model, tokenizer, facts[0].prompt)
    detach(model)
    base = _logits(model, tokenizer, facts[0].prompt)
    attach(model, [artifact], config)
    assert torch.equal(_logits(model, tokenizer, facts[0].prompt), edited)
    assert not torch.equal(edited, base)


@pytest.mark.parametrize("missing", [("value.weight",), ("key.weight", "value.weight")])
def test_experts_saved_before_the_key_projections_load_as_zero_projections(llama, missing):
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    config = EditConfig(**CONFIG)
    artifact = Editor(model, tokenizer, config).edit(facts)
    artifact = replace(artifact, weights=restore_key_readers(artifact.weights, artifact.anchors))  # whole projections
    zeroed = replace(artifact, weights={**artifact.weights, **{k: torch.zeros_like(artifact.weights[k]) for k in missing}})
    older = replace(artifact, weights={k: v for k, v in artifact.weights.items() if k not in missing})
    attach(model, [zeroed], config)
    expected = _logits(model, tokenizer, facts[0].prompt)
    attach(model, [older], config)
    assert torch.equal(_logits(model, tokenizer, facts[0].prompt), expected)


def test_key_readers_are_stored_as_their_images_at_the_anchors_and_answer_as_whole_projections(llama):
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    config = EditConfig(**CONFIG)
    base = [_logits(model, tokenizer, f.prompt) for f in facts]
    compact = Editor(model, tokenizer, config).edit(facts)
    anchors = compact.anchors
    for reader in KEY_READERS:
        assert f"{reader}.weight" not in compact.weights
        assert compact.weights[f"{reader}.anchor_images"].shape == (len(anchors), config.rank)
    # Whole projections as an older artifact stores them, with a part no anchor can see added: the
    # images, and so every answer, are the same.
    unseen = torch.eye(anchors.shape[1]) - torch.linalg.pinv(anchors) @ anchors
    whole = restore_key_readers(compact.weights, anchors)
    for reader in KEY_READERS:
        whole[f"{reader}.weight"] = whole[f"{reader}.weight"] + torch.randn(config.rank, anchors.shape[1]) @ unseen
    again = compact_key_readers(whole, anchors)
    for reader in KEY_READERS:
        assert torch.allclose(again[f"{reader}.anchor_images"], compact.weights[f"{reader}.anchor_images"], atol=1e-4)
    attach(model, [replace(compact, weights=whole)], config)
    from_whole = [_logits(model, tokenizer, f.prompt) for f in facts]
    attach(model, [compact], config)
    for fact, before, expected in zip(facts, base, from_whole):
        answered = _logits(model, tokenizer, fact.prompt)
        assert torch.allclose(answered, expected, atol=1e-4)
        assert not torch.allclose(answered, before, atol=1e-3)  # the expert answers


def test_keys_are_read_at_the_key_layer(llama):
    model, tokenizer = llama
    prompts = [f.prompt for f in tiny_facts()[:3]]
    editor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "key_layer": 1}))
    assert editor.adaptor.key_layer == 1 and editor.adaptor.layer == 2
    recorded = []
    key_mlp = model.model.layers[1].mlp
    handle = key_mlp.register_forward_pre_hook(lambda _m, args: recorded.append(args[0]))
    try:
        keys = torch.cat([editor.keys([prompt]) for prompt in prompts])  # one at a time: no padding
    finally:
        handle.remove()
    for prompt, key, x in zip(prompts, keys, recorded):
        assert x.shape[1] == len(encode_prompt(tokenizer, prompt))
        assert torch.allclose(key, torch.nn.functional.normalize(x[0, 1:].mean(dim=0), dim=0), atol=1e-6)
    keys_at_adaptor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "key_layer": 2})).keys(prompts)
    assert not torch.allclose(keys, keys_at_adaptor)


@pytest.mark.parametrize("key_layer", [1, 2])
def test_reading_keys_stops_at_the_key_layer_with_the_keys_a_full_forward_routes_on(llama, key_layer):
    model, tokenizer = llama
    prompts = [f.prompt for f in tiny_facts()[:4]]
    editor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "key_layer": key_layer}))
    ran = []
    handle = model.model.layers[key_layer + 1].register_forward_pre_hook(lambda *_: ran.append(True))
    try:
        keys = editor.keys(prompts)  # one padded batch
    finally:
        handle.remove()
    assert ran == []  # no layer above the key layer ran
    for prompt, key in zip(prompts, keys):
        _logits(model, tokenizer, prompt)  # a whole forward, as `ask` runs it
        assert torch.allclose(key, editor.adaptor.last_keys[0], atol=1e-5)


def test_settings_saved_before_key_layers_keep_keys_at_the_adaptor_layer():
    saved = {k: v for k, v in EditConfig(layer=18, threshold=0.9).to_dict().items() if k != "key_layer"}
    assert EditConfig.from_dict(saved).resolved_key_layer(30) == 18
    assert EditConfig(layer=18).resolved_key_layer(30) == 6
    with pytest.raises(ValueError, match="key layer"):
        EditConfig(layer=2, key_layer=3).resolved_key_layer(4)


def test_paper_routing_learns_its_batches_and_restores_from_artifacts(llama):
    model, tokenizer = llama
    facts = tiny_facts()
    config = EditConfig(**{**CONFIG, "routing": "kv-anchor-paper"})
    editor = Editor(model, tokenizer, config)
    first = editor.edit(facts[:6])
    snapshot = {k: v.clone() for k, v in editor.adaptor.experts[0].state_dict().items()}
    second = editor.edit(facts[6:])
    assert all(torch.equal(v, snapshot[k]) for k, v in editor.adaptor.experts[0].state_dict().items())
    assert set(second.weights) == set(first.weights) and "router.query" in first.weights
    assert not torch.equal(first.weights["router.query"], second.weights["router.query"])  # the projection learns
    assert evaluate(model, tokenizer, facts[6:]).rel == 1.0
    routed = [_route(model, tokenizer, f.prompt) for f in facts[6:]]
    assert routed == [1] * len(routed)
    unrelated = _route(model, tokenizer, "What is the name of the last episode?")
    assert unrelated in (0, 1)  # the paper's router has no "none"
    edited = _logits(model, tokenizer, facts[-1].prompt)
    detach(model)
    attach(model, [first, second], config)
    assert torch.equal(_logits(model, tokenizer, facts[-1].prompt), edited)


def _route(model, tokenizer, prompt: str) -> int:
    _logits(model, tokenizer, prompt)
    return find_adaptor(model).last_routes[0].expert


@pytest.mark.parametrize("order", ["cluster", "subject", "original", "random", "reverse"])
def test_plan_is_a_deterministic_permutation_in_batches(order):
    keys = torch.randn(23, 16, generator=torch.Generator().manual_seed(1))
    batches = plan(keys, 5, order, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(23))
    assert len(batches) == 5
    assert sorted(len(b) for b in batches) == [3, 5, 5, 5, 5]
    assert plan(keys, 5, order, seed=3) == batches
    if order in ("original", "subject"):  # no subjects given: subject order is the original order
        assert flat == list(range(23))
    if order == "reverse":
        assert flat == list(range(22, -1, -1))


def test_cluster_plan_keeps_labelled_groups_together():
    keys = torch.randn(30, 16, generator=torch.Generator().manual_seed(2))
    groups = [None] * 30
    for member in (3, 17, 25, 29):
        groups[member] = "same subject"
    for member in (0, 1):
        groups[member] = "other subject"
    batches = plan(keys, 5, "cluster", seed=0, groups=groups)
    assert sorted(i for b in batches for i in b) == list(range(30))
    assert all(len(b) == 5 for b in batches)
    assert any({3, 17, 25, 29} <= set(b) for b in batches)
    assert any({0, 1} <= set(b) for b in batches)


def test_subject_plan_keeps_the_order_and_pulls_a_subject_into_one_batch():
    groups = [None] * 12
    groups[1] = groups[7] = "same subject"
    batches = plan(torch.zeros(12, 4), 5, "subject", groups=groups)
    assert batches == [[0, 1, 7, 2, 3], [4, 5, 6, 8, 9], [10, 11]]


def test_cluster_plan_groups_similar_facts():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator) * 5
    keys = torch.cat([centres[i % 4] + 0.1 * torch.randn(32, generator=generator) for i in range(20)]).view(20, 32)
    batches = plan(keys, 5, "cluster", seed=0)
    for batch in batches:
        assert len({i % 4 for i in batch}) == 1  # each batch is one cluster


def _greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_the_expert_acts_on_the_answer_span_only_and_then_the_gate_closes(llama):
    """After the target, greedy generation no longer gets the expert's push: every later token is what the
    model computes with the expert forced on exactly the answer positions; an expert left open (the old
    behaviour, which looped on its answer) gives other tokens."""
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    editor = Editor(model, tokenizer, EditConfig(**CONFIG))
    artifact = editor.edit(facts)
    assert artifact.anchor_spans == [len(encode_pair(tokenizer, f.prompt, f.target).answer) for f in facts]
    adaptor = editor.adaptor
    opened = 0
    for fact in facts:
        prompt = encode_prompt(tokenizer, fact.prompt)
        answer = encode_pair(tokenizer, fact.prompt, fact.target).answer
        generated = _greedy(model, tokenizer, fact.prompt, len(answer) + 6)
        assert generated[: len(answer)] == answer
        key = editor.keys([fact.prompt])

        def continued(span: int | None) -> list[int]:
            """Greedy tokens by full forwards, the expert forced on `span` positions from the last prompt token."""
            sequence = list(prompt)
            decision = RoutingDecision(torch.tensor([0]), torch.tensor([len(prompt) - 1]), keys=key,
                                       span=None if span is None else torch.tensor([span]))
            for _ in range(len(generated)):
                with torch.no_grad(), adaptor.forced(decision):
                    sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
            return sequence[len(prompt):]

        assert generated == continued(len(answer))
        opened += continued(None) != generated
    assert opened > 0  # the check can fail: leaving the gate open changes the continuation


def test_a_neighbour_with_another_subject_keeps_the_base_logits_while_its_fact_routes(llama):
    """Same relation, other subject: the subject check keeps it from the edited fact's anchor, however close
    their keys; a rephrase that mentions the subject mid-sentence still finds its fact."""
    model, tokenizer = llama
    fact = Fact(prompt="The official language of Orvania is", target="Finnish", id="orvania", subject="Orvania")
    neighbour = "The official language of Kestria is"
    rephrase = "the quick fox: the official language of Orvania is"
    base = _logits(model, tokenizer, neighbour)
    editor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "threshold": 0.5, "subject_threshold": 0.5}))
    artifact = editor.edit([fact])
    assert artifact.anchor_subjects[0]  # both spellings of the subject, with and without a leading space
    assert torch.equal(_logits(model, tokenizer, neighbour), base)
    assert editor.adaptor.last_routes[0].expert == NO_EXPERT
    assert editor.adaptor.last_routes[0].similarity > 0.9  # close enough to have routed by similarity alone
    assert _route(model, tokenizer, rephrase) == 0
    assert _route(model, tokenizer, fact.prompt) == 0


def test_a_fact_without_a_subject_is_routed_by_similarity_alone(llama):
    model, tokenizer = llama
    fact = Fact(prompt="The official language of Orvania is", target="Finnish", id="orvania")
    editor = Editor(model, tokenizer, EditConfig(**{**CONFIG, "threshold": 0.5}))
    artifact = editor.edit([fact])
    assert artifact.anchor_subjects == [[]] and artifact.stats["facts_without_subject_check"] == 1
    assert _route(model, tokenizer, "The official language of Kestria is") == 0


def test_batched_free_generation_answers_as_one_prompt_at_a_time(llama):
    model, tokenizer = llama
    facts = tiny_facts()
    Editor(model, tokenizer, EditConfig(**CONFIG)).edit(facts[:6])
    prompts = [f.prompt for f in facts[:4]] + [f.prompt for f in facts[8:]]  # routed and unrouted rows, mixed
    batched = greedy_texts(model, tokenizer, prompts, 8, stopped=False, batch_size=8)
    assert batched == [greedy_texts(model, tokenizer, [p], 8, stopped=False)[0] for p in prompts]
    scores = evaluate(model, tokenizer, facts[:6], generate=True)
    assert scores.wild_rel is not None and scores.wild_loc == 1.0
    assert {s["kind"] for s in scores.samples} == {"edit", "rephrase", "locality"}


def test_context_copies_teach_the_fact_behind_a_prefix_without_becoming_anchors(llama):
    model, tokenizer = llama
    facts = tiny_facts()[:4]
    config = EditConfig(**{**CONFIG, "context_templates": 2, "threshold": 0.5, "subject_threshold": 0.3})
    editor = Editor(model, tokenizer, config)
    prefixes = editor.prefixes()
    assert len(prefixes) == 2 and all(p.endswith(". ") for p in prefixes)
    artifact = editor.edit(facts)
    assert len(artifact.anchor_facts) == len(facts)  # copies are trained, never anchors
    assert 0 < artifact.stats["context_copies_trained"] <= 2 * len(facts)
    taught = 0
    for fact in facts:
        prompt = prefixes[0] + fact.prompt
        answer = encode_pair(tokenizer, prompt, fact.target).answer
        if _route(model, tokenizer, prompt) == 0:
            taught += 1
            assert _greedy(model, tokenizer, prompt, len(answer)) == answer
    assert taught > 0


def test_a_bfloat16_model_edits_with_float32_experts_and_restores_from_artifacts(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir), device="cpu", dtype=torch.bfloat16)
    facts = tiny_facts()[:6]
    pairs = [encode_pair(tokenizer, f.prompt, f.target) for f in facts]
    unrelated = "What is the name of the last episode?"
    base_unrelated = _logits(model, tokenizer, unrelated)
    artifact = Editor(model, tokenizer, EditConfig(**CONFIG)).edit(facts)
    adaptor = find_adaptor(model)
    assert adaptor.experts[0].gate.weight.dtype == torch.float32 and adaptor.base_parameter().dtype == torch.bfloat16
    assert teacher_forced_predictions(model, tokenizer, pairs) == [p.answer for p in pairs]
    assert torch.equal(_logits(model, tokenizer, unrelated), base_unrelated)
    edited = [_logits(model, tokenizer, f.prompt) for f in facts]

    attach(model, [artifact], EditConfig(**CONFIG))  # loaded back from its (float16) artifact: the same answers
    assert all(torch.equal(_logits(model, tokenizer, f.prompt), before) for f, before in zip(facts, edited))


def test_greedy_continuations_are_the_models_own_next_tokens(llama):
    model, tokenizer = llama
    pairs = [encode_pair(tokenizer, f.prompt, f.target) for f in tiny_facts()[:3]]
    found = greedy_continuations(model, tokenizer, pairs, 4)
    for pair, (tokens, logprobs) in zip(pairs, found):
        ids = torch.tensor([pair.prompt + pair.answer])
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert tokens == expected
        assert logprobs.shape == (4, model.config.vocab_size) and logprobs.argmax(dim=-1).tolist() == tokens
        with torch.no_grad():  # the cached, left-padded batch reads as each sequence run whole, alone
            whole = model(input_ids=torch.tensor([pair.prompt + pair.answer + tokens[:-1]])).logits[0, -4:]
        assert torch.allclose(logprobs, whole.float().log_softmax(dim=-1), atol=1e-4)


def test_continuation_tokens_train_the_drift_from_the_base_model_after_the_answer(llama, monkeypatch):
    """The gate is closed after the answer, but later tokens attend to the pushed answer positions; the
    divergence training adds there is the edited model's KL from the base model's own continuation of
    prompt + target, position for position (a misaligned or unrouted term would differ)."""
    model, tokenizer = llama
    facts = tiny_facts()[:6]
    pairs = [encode_pair(tokenizer, f.prompt, f.target) for f in facts]
    detach(model)
    base = greedy_continuations(model, tokenizer, pairs, 3)
    trained: list[float] = []
    kl_div = torch.nn.functional.kl_div

    def recording_kl_div(*args, **kwargs):
        trained.append(float((value := kl_div(*args, **kwargs)).detach()))
        return value

    monkeypatch.setattr(torch.nn.functional, "kl_div", recording_kl_div)
    # Stops as soon as every answer token is the argmax, so the last term recorded is the final expert's.
    config = EditConfig(**{**CONFIG, "loss_floor": 100.0, "expert_dtype": "float32"}, continuation_tokens=3)
    Editor(model, tokenizer, config).edit(facts)
    monkeypatch.undo()
    drift, positions = 0.0, 0
    for pair, (tokens, base_logprobs) in zip(pairs, base):
        ids = torch.tensor([pair.prompt + pair.answer + tokens[:-1]])
        with torch.no_grad(), find_adaptor(model).teacher_forcing(torch.tensor([len(pair.prompt)])):
            edited = model(input_ids=ids).logits[0, len(pair.prompt) + len(pair.answer) - 1 :].float()
        drift += float(kl_div(edited.log_softmax(dim=-1), base_logprobs, log_target=True, reduction="sum"))
        positions += len(tokens)
    assert trained[-1] > 0 and drift > 0
    assert trained[-1] == pytest.approx(drift / positions, rel=1e-3)


def test_continuations_go_to_answered_rows_wherever_the_locality_rows_stand(llama):
    """Locality rows keep the base model's labels and get no continuation; every other row gets the base
    model's own next tokens after its answer, in whatever order the batch holds its rows."""
    model, tokenizer = llama
    detach(model)
    editor = Editor(model, tokenizer, EditConfig(**CONFIG, continuation_tokens=2))
    batch = editor._prepare(tiny_facts()[:3])
    order = sorted(range(len(batch.rows)), key=lambda i: batch.rows[i].labels is None)  # locality rows first
    assert batch.rows[order[0]].labels is not None and batch.rows[order[-1]].labels is None
    picked = torch.tensor(order)
    batch.rows = [batch.rows[i] for i in order]
    batch.prompt_mask = batch.prompt_mask[picked]
    batch.prefix = [(k[picked], v[picked]) for k, v in batch.prefix]
    editor._add_continuations(batch)
    answered = [row for row in batch.rows if row.labels is None]
    expected = greedy_continuations(model, tokenizer, [row.pair for row in answered], 2)
    assert [row.continuation for row in answered] == [tokens for tokens, _ in expected]
    assert all(row.continuation == [] for row in batch.rows if row.labels is not None)
    detach(model)


def test_portability_scores_the_questions_that_depend_on_an_edit(llama):
    """Portability = teacher-forced accuracy on the facts' portability questions, never trained on."""
    model, tokenizer = llama
    facts = [replace(f, portability=(Locality(f.prompt, f.target), Locality("0 1 2 3 4 5 6 7 8", "1 2")))
             for f in tiny_facts()[:4]]
    Editor(model, tokenizer, EditConfig(**CONFIG)).edit([replace(f, portability=()) for f in facts])
    scores = evaluate(model, tokenizer, facts, generate=True)
    questions = [encode_pair(tokenizer, q.prompt, q.answer) for f in facts for q in f.portability]
    expected = [sum(int(p == a) for p, a in zip(predicted, pair.answer)) / len(pair.answer)
                for predicted, pair in zip(teacher_forced_predictions(model, tokenizer, questions), questions)]
    assert scores.portability == pytest.approx(sum(expected) / len(expected))
    assert expected[0::2] == [1.0] * 4  # the edit prompt itself, as a question: answered by its expert
    assert scores.wild_portability == pytest.approx(scores.wild_rel / 2)  # the unrelated probe: not its answer
    assert [s["kind"] for s in scores.samples].count("portability") == 8
    detach(model)
