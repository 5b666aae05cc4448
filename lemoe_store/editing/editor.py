"""Training one frozen expert per edit batch.

Speed comes from what the routing rule guarantees: an expert acts only from the last prompt token on,
so every earlier position is the base model's at every layer. One forward over the prompts gives both
their routing keys and their K/V cache; each training step then runs only the answer positions
(last prompt token + the answer's tokens) on top of that cache, and stops as soon as every answer token
is the argmax and the loss is below a floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..schemas.facts import Fact
from .adaptor import (ROUTER_PREFIX, Expert, ExpertArtifact, LemoeAdaptor, RoutingDecision, attach, compact_key_readers,
                      decoder_layers, restore_key_readers)
from .batching import (Pair, chunk_layout, continue_after_answers, encode_pair, left_pad, model_device, positions,
                       prompt_prefix, routing_keys, teacher_forced_predictions)
from .config import EditConfig
from .routing import NO_EXPERT, occurs
from .wild import greedy_texts

StepCallback = Callable[[int, float], None]


@dataclass
class _Row:
    """One training prompt: the fact it belongs to, its tokens, whether its key becomes an anchor, and
    the labels (None: the answer itself; locality rows: the base model's predictions); anchors also
    carry their fact's subject as token sequences found in the prompt (empty: no subject check)."""

    fact_id: str
    pair: Pair
    anchor: bool
    labels: list[int] | None = None
    subject: list[list[int]] | None = None
    own_anchor_only: bool = False  # trained only where routing finds the row's own fact (context copies)
    continuation: list[int] = field(default_factory=list)  # the base model's next tokens after the answer
    continuation_logprobs: torch.Tensor | None = None  # (len(continuation), vocab): its distributions there


def subject_sequences(tokenizer, subject: str, prompt: list[int]) -> list[list[int]]:
    """The subject's token sequences, as it reads at the start of a text and after a space (a query may
    place it either way); empty when the subject is blank or occurs in neither form in `prompt` (then the
    anchor is matched by similarity alone, or the fact's own prompt could not reach it)."""
    if not subject.strip():
        return []
    variants = {tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (subject, " " + subject)}
    variants.discard(())
    return [list(v) for v in sorted(variants)] if any(occurs(v, prompt) for v in variants) else []


CONTEXT_STARTS = ("The weather today", "In the morning,", "My favourite book", "Yesterday I", "The report says",
                  "According to the news,", "In 1990,", "Scientists found that", "We walked to")
CONTEXT_TOKENS = 10


def context_prefixes(base_model, tokenizer, count: int) -> list[str]:
    """ROME's and WISE's context templates: short texts the base model writes itself (greedy, from fixed
    first words), each put before a fact's prompt as "<text>. <prompt>", so the expert learns its fact in
    more than one surrounding and leans on the fact's key rather than on one wording. (One-word starts, as
    ROME samples from, give loops under greedy decoding on small models: these read as prose.)"""
    starts = list(CONTEXT_STARTS[:count])
    texts = greedy_texts(base_model, tokenizer, starts, CONTEXT_TOKENS, stopped=False)
    return [" ".join(f"{start}{text}".split()).rstrip(".") + ". " for start, text in zip(starts, texts)]


def _anchor_row(tokenizer, fact: Fact, prompt: str) -> _Row:
    pair = encode_pair(tokenizer, prompt, fact.target)
    return _Row(fact.id, pair, True, subject=subject_sequences(tokenizer, fact.subject, pair.prompt))


class _Replay(nn.Module):
    """Stands in for a decoder layer below the adaptor during training: their output never changes
    (no expert acts below the adaptor), so the first stand-in returns the recorded input of the adaptor's
    layer and the others pass it on. Each step then costs only the layers from the adaptor up."""

    def __init__(self, recorded: torch.Tensor | None) -> None:
        super().__init__()
        self.recorded = recorded

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.recorded if self.recorded is not None else hidden_states


@contextmanager
def lower_layers_replayed(model: nn.Module, layer: int, recorded: torch.Tensor) -> Iterator[None]:
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(layer)]
    for i in range(layer):
        layers[i] = _Replay(recorded if i == 0 else None)
    try:
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


@contextmanager
def recording_input(module: nn.Module, into: list) -> Iterator[None]:
    handle = module.register_forward_pre_hook(lambda _m, args: into.append(args[0].detach()))
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _Batch:
    """An edit batch's rows after one forward: their keys (B, H) and K/V cache up to the last prompt token."""

    rows: list[_Row]
    prompt_mask: torch.Tensor
    keys: torch.Tensor
    prefix: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def is_anchor(self) -> torch.Tensor:
        return torch.tensor([r.anchor for r in self.rows])

    @property
    def anchors(self) -> torch.Tensor:
        return self.keys[self.is_anchor]

    @property
    def anchor_facts(self) -> list[str]:
        return [r.fact_id for r in self.rows if r.anchor]

    @property
    def anchor_spans(self) -> list[int]:
        return [len(r.pair.answer) for r in self.rows if r.anchor]

    @property
    def anchor_subjects(self) -> list[list[list[int]]]:
        return [r.subject for r in self.rows if r.anchor]


class Editor:
    """Edits a model batch by batch; earlier experts stay frozen, the base model is never touched."""

    def __init__(self, model, tokenizer, config: EditConfig, experts: list[ExpertArtifact] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.adaptor: LemoeAdaptor = attach(model, list(experts), config)
        self.device = model_device(model)
        self._prefixes: list[str] | None = None

    def prefixes(self) -> list[str]:
        """The context prefixes of `config.context_templates` (written once by the base model)."""
        if self._prefixes is None:
            with self.adaptor.bypassed():  # written by the base model, whatever experts are attached
                self._prefixes = context_prefixes(self.model, self.tokenizer, self.config.context_templates)
        return self._prefixes

    def keys(self, prompts: list[str]) -> torch.Tensor:
        """Routing keys (N, H) of prompts, exactly as inference computes them."""
        return routing_keys(self.model, self.tokenizer, prompts)

    def _prepare(self, facts: list[Fact]) -> _Batch:
        """The batch's training rows, run once through the model: routing keys, K/V cache, anchors."""
        if not facts:
            raise ValueError("an edit batch needs at least one fact")
        rows = [_anchor_row(self.tokenizer, f, f.prompt) for f in facts]
        if self.config.anchor_rephrases:
            rows += [_anchor_row(self.tokenizer, f, r) for f in facts for r in f.rephrases]
        if self.config.context_templates:
            rows += [_Row(f.id, encode_pair(self.tokenizer, prefix + f.prompt, f.target), False, own_anchor_only=True)
                     for f in facts for prefix in self.prefixes()]
        if self.config.locality_regulariser:
            rows += self._locality_rows(facts)
        prompt_ids, prompt_mask = left_pad([r.pair.prompt for r in rows], self.tokenizer.pad_token_id, self.device)
        with torch.no_grad():
            out = self.model(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                position_ids=positions(prompt_mask),
                use_cache=True,
                logits_to_keep=1,  # only the keys and the cache are wanted: skip the vocabulary projection
            )
        keys = self.adaptor.last_keys.cpu()
        # The last prompt token is re-run in every step (the expert acts on it): cache only what precedes it.
        return _Batch(rows, prompt_mask, keys, prompt_prefix(out.cache))

    def stand_in(self, facts: list[Fact]) -> ExpertArtifact:
        """The anchors `edit(facts)` will store, with zero weights and without training: what a parallel
        worker needs to know about the experts before its own (see `lemoe_store.parallel`)."""
        batch = self._prepare(facts)
        shapes = Expert(self.adaptor.hidden, self.config.rank).state_dict()
        return ExpertArtifact({k: torch.zeros_like(v) for k, v in shapes.items()}, batch.anchors.float(),
                              batch.anchor_facts, {}, batch.anchor_spans, batch.anchor_subjects)

    def edit(self, facts: list[Fact], on_step: StepCallback | None = None) -> ExpertArtifact:
        """Train a new expert on `facts`, freeze it, keep it attached, and return it.

        Trained prompts: each fact's prompt, plus (with `anchor_rephrases`) its rephrases, which also become
        anchors; with `context_templates`, the prompt behind that many context prefixes (not anchors; trained
        where they route to their own fact, with its key); with `locality_regulariser`, a fact's locality
        prompts that would route to the new expert are trained to keep the base model's predictions.
        """
        began = time.perf_counter()
        expert_index = len(self.adaptor.experts)
        torch.manual_seed(self.config.seed * 100_003 + expert_index)
        batch = self._prepare(facts)
        if self.config.continuation_tokens:
            self._add_continuations(batch)
        rows, prompt_mask, keys, prefix = batch.rows, batch.prompt_mask, batch.keys, batch.prefix
        is_anchor, anchors = batch.is_anchor, batch.anchors
        anchor_facts, anchor_spans, anchor_subjects = batch.anchor_facts, batch.anchor_spans, batch.anchor_subjects
        self.adaptor.add_expert(rank=self.config.rank)
        self.adaptor.add_anchors(anchors, expert_index, anchor_facts, anchor_spans, anchor_subjects)
        router = self.adaptor.paper_router
        if router is None:
            # Train exactly the prompts that inference will route to this expert, on the span it acts on.
            routes = self.adaptor.anchors.route(keys.to(self.device), [r.pair.prompt for r in rows])
            trained = torch.tensor([
                route.expert == expert_index
                and (not row.own_anchor_only or self.adaptor.anchor_facts[route.anchor] == row.fact_id)
                for route, row in zip(routes, rows)], device=self.device)
            keys = self.adaptor.anchors.matched_keys(keys, routes)
            spans = self.adaptor.anchors.spans_of(routes)
        else:
            # The paper's routing is learned: the batch's prompts are trained to route to the new expert.
            router.add_key(router.queries(anchors).mean(dim=0))
            trained = is_anchor.to(self.device)
            spans = torch.tensor([len(r.pair.answer) for r in rows])
        trained_weights = dict(self.adaptor.experts[expert_index].named_parameters())
        if router is not None:
            trained_weights |= {f"{ROUTER_PREFIX}key": router.keys[expert_index],
                                f"{ROUTER_PREFIX}query": router.query.weight}
        parameters = list(trained_weights.values())
        for parameter in parameters:
            parameter.requires_grad_(True)
        try:
            steps, loss = self._train(parameters, rows, prompt_mask, prefix, trained, spans, expert_index, keys,
                                      on_step)
        finally:
            for parameter in parameters:
                parameter.requires_grad_(False)
        # Frozen at the storage precision, key readers as their images at the anchors (anchor routing), and
        # the live expert made the same way: the model answers now exactly as it will once the version is
        # loaded back from the store.
        storage = getattr(torch, self.config.expert_dtype)
        weights = {k: v.detach().to("cpu", storage).clone() for k, v in trained_weights.items()}
        if router is None:
            weights = compact_key_readers(weights, anchors)
        live = restore_key_readers(weights, anchors)
        with torch.no_grad():
            for name, parameter in trained_weights.items():
                parameter.copy_(live[name].to(parameter.device, parameter.dtype))
        stats = {
            "steps": steps,
            "loss": round(loss, 6),
            "seconds": round(time.perf_counter() - began, 3),
            "facts": len(facts),
            "prompts_trained": int(trained.sum()),
            "edit_prompts_routed_to_expert": int(trained[: len(facts)].sum()),
            "context_copies_trained": int(sum(t for t, r in zip(trained.tolist(), rows) if r.own_anchor_only)),
            "locality_prompts_guarded": int(sum(t for t, r in zip(trained.tolist(), rows) if r.labels is not None)),
            "facts_without_subject_check": sum(1 for r in rows[: len(facts)] if not r.subject),
        }
        return ExpertArtifact(weights, anchors.float(), anchor_facts, stats, anchor_spans, anchor_subjects)

    def _add_continuations(self, batch: _Batch) -> None:
        """What the base model writes after each row's answer, and its distributions there (to keep); not
        for locality rows, whose labels are the base model's already."""
        answered = [row for row in batch.rows if row.labels is None]
        picked = torch.tensor([row.labels is None for row in batch.rows], device=self.device)
        prefix = [(k[picked], v[picked]) for k, v in batch.prefix]  # the cache is (rows, heads, tokens, dim)
        with self.adaptor.bypassed():
            found = continue_after_answers(self.model, [r.pair for r in answered], batch.prompt_mask[picked], prefix,
                                           self.config.continuation_tokens, self.tokenizer.pad_token_id)
        for row, (tokens, logprobs) in zip(answered, found):
            row.continuation, row.continuation_logprobs = tokens, logprobs

    def _locality_rows(self, facts: list[Fact]) -> list[_Row]:
        """Locality prompts with the base model's own teacher-forced predictions as their labels."""
        pairs = [(f.id, encode_pair(self.tokenizer, loc.prompt, loc.answer)) for f in facts for loc in f.locality]
        if not pairs:
            return []
        with self.adaptor.bypassed():
            base = teacher_forced_predictions(self.model, self.tokenizer, [p for _, p in pairs])
        return [_Row(fid, pair, False, labels) for (fid, pair), labels in zip(pairs, base)]

    def _train(self, parameters, rows, prompt_mask, prefix, trained, spans, expert_index, keys,
               on_step) -> tuple[int, float]:
        device, pad = self.device, self.tokenizer.pad_token_id
        width = max(len(r.pair.answer) + len(r.continuation) for r in rows)
        inputs = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        kept = torch.zeros((len(rows), width), dtype=torch.bool)  # continuation positions: keep the base's
        chunk_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            answer = len(row.pair.answer)
            chunk = [row.pair.prompt[-1]] + row.pair.answer[:-1]
            if row.continuation:  # the last answer token is then an input too, and the continuation after it
                chunk += row.pair.answer[-1:] + row.continuation[:-1]
            inputs[index, : len(chunk)] = torch.tensor(chunk)
            labels[index, :answer] = torch.tensor(row.labels or row.pair.answer)
            kept[index, answer : answer + len(row.continuation)] = bool(trained[index])
            chunk_mask[index, : len(chunk)] = 1
        labels[~trained.cpu()] = -100  # prompts routed elsewhere cannot be changed by this expert
        base_logprobs = torch.cat([r.continuation_logprobs for r, k in zip(rows, kept) if k.any()] or
                                  [torch.empty(0)]).to(device)
        inputs, labels, kept, chunk_mask = inputs.to(device), labels.to(device), kept.to(device), chunk_mask.to(device)
        attention, chunk_positions = chunk_layout(prompt_mask, chunk_mask)
        route = torch.where(trained, expert_index, NO_EXPERT)
        start = torch.zeros(len(rows), dtype=torch.long, device=device)
        router = self.adaptor.paper_router
        keys = keys.to(device)
        optimizer = torch.optim.Adam(parameters, lr=self.config.lr)
        counted = labels != -100
        loss_value = float("nan")
        if not bool(counted.any()):
            return 0, loss_value

        # The vocabulary projection dominates a step: apply it only where a target token is predicted.
        lm_head = self.model.get_output_embeddings()
        targets = labels[counted]

        def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Logits at the target positions, the loss of routing (zero under anchor routing) and the
            divergence from the base model after the answers (zero without continuations)."""
            decision = RoutingDecision(route, start, keys=keys, span=spans.to(device))
            routing_loss = torch.zeros((), device=device)
            if router is not None:  # the routed expert's output is weighted by its softmax probability
                router_logits = router.logits(keys)
                decision.weights = torch.softmax(router_logits, dim=-1)[:, expert_index]
                routing_loss = torch.nn.functional.cross_entropy(router_logits[trained], route[trained])
            cache = DynamicCache(ddp_cache_data=prefix, config=self.model.config)
            with self.adaptor.forced(decision):
                hidden = self.model.base_model(
                    input_ids=inputs,
                    attention_mask=attention,
                    position_ids=chunk_positions,
                    cache=cache,
                    use_cache=True,
                ).last_hidden_state
            drift = torch.zeros((), device=device)
            if bool(kept.any()):
                edited = lm_head(hidden[kept]).float().log_softmax(dim=-1)
                drift = torch.nn.functional.kl_div(edited, base_logprobs, log_target=True, reduction="batchmean")
            return lm_head(hidden[counted]), routing_loss, drift

        recorded: list[torch.Tensor] = []
        with recording_input(decoder_layers(self.model)[self.adaptor.layer], recorded):
            logits, routing_loss, drift = forward()
        with lower_layers_replayed(self.model, self.adaptor.layer, recorded[0]):
            for step in range(1, self.config.max_steps + 1):
                if step > 1:
                    logits, routing_loss, drift = forward()
                answer_loss = torch.nn.functional.cross_entropy(logits.float(), targets) + routing_loss
                loss = answer_loss + drift
                loss_value = loss.item()
                if on_step:
                    on_step(step, loss_value)
                # Done once the answers are learnt; the drift term only shapes how they are learnt.
                learnt = bool((logits.argmax(-1) == targets).all())
                if learnt and answer_loss.item() <= self.config.loss_floor:
                    return step - 1, loss_value
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return self.config.max_steps, loss_value
