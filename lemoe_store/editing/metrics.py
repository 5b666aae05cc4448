"""Rel / Gen / Loc (EasyEdit definitions) and routing accuracy of an edited model.

Rel: teacher-forced token accuracy of the new target after the edit prompt.
Gen: the same after each rephrase.
Loc: share of the locality answer's tokens whose argmax is unchanged from the base model's
     (the base model = the same model with the adaptor bypassed).
Portability: teacher-forced token accuracy of the answers to questions that depend on the edited fact
     (EasyEdit's portability; ZsRE's `portability` field).
PPL: perplexity of the target after the edit prompt, exp(mean token NLL), averaged over facts (lower is
     better; the metric of long-form edits, WISE's hallucination benchmark), beside the base model's.

With `generate=True`, the free-generation (WILD) protocol too (see `wild.py`): wild_rel / wild_gen /
wild_loc, fluency and degenerate continuations, each beside the base model's on the same prompts.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from ..schemas.facts import Fact
from .adaptor import find_adaptor
from .batching import (Pair, encode_pair, encode_prompt, routing_keys, teacher_forced, teacher_forced_predictions,
                       token_accuracy)
from .routing import NO_EXPERT
from .wild import (ANSWER_TOKENS, CONTINUATION_TOKENS, generation_entropy, greedy_texts, is_degenerate, mean,
                   starts_with_target)


@dataclass
class Scores:
    rel: float
    gen: float | None
    loc: float | None
    facts: int
    portability: float | None = None  # teacher-forced accuracy on questions that follow from the edit
    ppl: float | None = None  # perplexity of the target after the edit prompt, mean over facts
    base_ppl: float | None = None  # the same on the base model
    routing_edit: float | None = None  # share of edit prompts routed to their own expert
    routing_rephrase: float | None = None  # share of rephrases routed to their fact's expert
    routing_locality: float | None = None  # share of locality prompts routed to no expert
    wild_rel: float | None = None  # free generation: the edit prompt's answer starts with the target
    wild_gen: float | None = None  # ... a rephrase's answer does
    wild_loc: float | None = None  # a locality prompt's answer equals the base model's
    wild_portability: float | None = None  # a portability question's answer starts with its answer
    fluency: float | None = None  # generation entropy of edit-prompt continuations
    base_fluency: float | None = None  # the same continuations of the base model
    degenerate: float | None = None  # share of continuations with distinct word-bigram ratio < 0.5
    base_degenerate: float | None = None
    samples: list[dict] = field(default_factory=list, repr=False)  # free-generation answers, to read

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("samples")
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in data.items()}

    @property
    def mean(self) -> float:
        return _mean_of(self.rel, self.gen, self.loc)

    @property
    def wild_mean(self) -> float | None:
        return _mean_of(self.wild_rel, self.wild_gen, self.wild_loc) if self.wild_rel is not None else None


def _mean_of(*values: float | None) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present)



@dataclass
class BaseGenerations:
    """The unedited model's free generations for `facts`: locality answers and edit-prompt continuations
    (taken once, before editing, for editors that change the weights themselves)."""

    locality: list[str]
    continuations: list[str]


def base_generations(model, tokenizer, facts: list[Fact]) -> BaseGenerations:
    with _as_base_model(model):
        return BaseGenerations(
            greedy_texts(model, tokenizer, [loc.prompt for f in facts for loc in f.locality], ANSWER_TOKENS,
                         stopped=True),
            greedy_texts(model, tokenizer, [f.prompt for f in facts], CONTINUATION_TOKENS, stopped=False),
        )


@torch.no_grad()
def evaluate(model, tokenizer, facts: list[Fact], batch_size: int = 16,
             base_locality: list[list[int]] | None = None, *, generate: bool = False,
             base: BaseGenerations | None = None, base_perplexities: list[float] | None = None) -> Scores:
    """Score `facts` on the model as it is (with whatever experts its adaptor holds).

    Loc and base PPL compare with the base model: the adaptor bypassed, or `base_locality` (from
    `locality_predictions`) and `base_perplexities` (from `target_perplexities`), taken on the unedited
    model, for editors that change the weights themselves.
    generate: also the free-generation metrics, against `base` (default: the adaptor bypassed).
    """
    adaptor = find_adaptor(model)
    edit_pairs = [encode_pair(tokenizer, f.prompt, f.target) for f in facts]
    rephrase_pairs = [(i, encode_pair(tokenizer, r, f.target)) for i, f in enumerate(facts) for r in f.rephrases]
    loc_pairs = locality_pairs(tokenizer, facts)

    def accuracy(pairs: list[Pair], predictions: list[list[int]]) -> list[float]:
        return [token_accuracy(pred, pair.answer) for pair, pred in zip(pairs, predictions)]

    edits = teacher_forced(model, tokenizer, edit_pairs, batch_size)
    rel = accuracy(edit_pairs, [row.predictions for row in edits])
    reph = [p for _, p in rephrase_pairs]
    gen = accuracy(reph, teacher_forced_predictions(model, tokenizer, reph, batch_size))
    ported = [encode_pair(tokenizer, q.prompt, q.answer) for f in facts for q in f.portability]
    portability = accuracy(ported, teacher_forced_predictions(model, tokenizer, ported, batch_size))
    loc: list[float] = []
    if loc_pairs:
        after = teacher_forced_predictions(model, tokenizer, loc_pairs, batch_size)
        before = base_locality if base_locality is not None else base_predictions(model, tokenizer, loc_pairs, batch_size)
        loc = [token_accuracy(a, b) for a, b in zip(after, before)]
    if base_perplexities is None and adaptor is not None:
        base_perplexities = _base_perplexities(model, tokenizer, edit_pairs, batch_size)
    scores = Scores(rel=mean(rel) or 0.0, gen=mean(gen), loc=mean(loc), facts=len(facts),
                    portability=mean(portability), ppl=mean([math.exp(row.nll) for row in edits]),
                    base_ppl=mean(base_perplexities or []))
    if adaptor is not None and adaptor.anchor_facts:  # routed by anchors (not a peer editor's own router)
        _routing_accuracy(adaptor, tokenizer, facts, scores, model)
    if generate:
        _free_generation(model, tokenizer, facts, scores, base or base_generations(model, tokenizer, facts))
    return scores


def _free_generation(model, tokenizer, facts: list[Fact], scores: Scores, base: BaseGenerations) -> None:
    def answers(prompts: list[str]) -> list[str]:
        return greedy_texts(model, tokenizer, prompts, ANSWER_TOKENS, stopped=True)

    edit = answers([f.prompt for f in facts])
    rephrased = [(f, r) for f in facts for r in f.rephrases]
    rephrase = answers([r for _, r in rephrased])
    localities = [loc for f in facts for loc in f.locality]
    locality = answers([loc.prompt for loc in localities])
    questions = [q for f in facts for q in f.portability]
    ported = answers([q.prompt for q in questions])
    continuations = greedy_texts(model, tokenizer, [f.prompt for f in facts], CONTINUATION_TOKENS, stopped=False)
    scores.wild_rel = mean([float(starts_with_target(a, f.target)) for a, f in zip(edit, facts)])
    scores.wild_gen = mean([float(starts_with_target(a, f.target)) for a, (f, _) in zip(rephrase, rephrased)])
    scores.wild_loc = mean([float(a == b) for a, b in zip(locality, base.locality)])
    scores.wild_portability = mean([float(starts_with_target(a, q.answer)) for a, q in zip(ported, questions)])
    scores.fluency = mean([generation_entropy(t) for t in continuations])
    scores.base_fluency = mean([generation_entropy(t) for t in base.continuations])
    scores.degenerate = mean([float(is_degenerate(t)) for t in continuations])
    scores.base_degenerate = mean([float(is_degenerate(t)) for t in base.continuations])
    scores.samples = (
        [{"kind": "edit", "prompt": f.prompt, "target": f.target, "answer": a, "continuation": c,
          "base_continuation": b} for f, a, c, b in zip(facts, edit, continuations, base.continuations)]
        + [{"kind": "rephrase", "prompt": r, "target": f.target, "answer": a} for (f, r), a in zip(rephrased, rephrase)]
        + [{"kind": "locality", "prompt": loc.prompt, "answer": a, "base_answer": b}
           for loc, a, b in zip(localities, locality, base.locality)]
        + [{"kind": "portability", "prompt": q.prompt, "target": q.answer, "answer": a}
           for q, a in zip(questions, ported)]
    )


def target_perplexities(model, tokenizer, facts: list[Fact], batch_size: int = 16) -> list[float]:
    """The base model's perplexity of each fact's target after its prompt (for `evaluate`)."""
    return _base_perplexities(model, tokenizer, [encode_pair(tokenizer, f.prompt, f.target) for f in facts],
                              batch_size)


def _base_perplexities(model, tokenizer, pairs: list[Pair], batch_size: int) -> list[float]:
    with _as_base_model(model):
        return [math.exp(row.nll) for row in teacher_forced(model, tokenizer, pairs, batch_size)]


def locality_pairs(tokenizer, facts: list[Fact]) -> list[Pair]:
    """Every locality prompt of `facts`, in order, with its expected answer."""
    return [encode_pair(tokenizer, loc.prompt, loc.answer) for f in facts for loc in f.locality]


def locality_predictions(model, tokenizer, facts: list[Fact], batch_size: int = 16) -> list[list[int]]:
    """The base model's teacher-forced predictions on `facts`' locality prompts (for `evaluate`)."""
    return base_predictions(model, tokenizer, locality_pairs(tokenizer, facts), batch_size)


def base_predictions(model, tokenizer, pairs: list[Pair], batch_size: int = 16) -> list[list[int]]:
    """Teacher-forced predictions of the base model: the adaptor (if any) routes nothing."""
    with _as_base_model(model):
        return teacher_forced_predictions(model, tokenizer, pairs, batch_size)


def _as_base_model(model):
    """A context within which `model` is its base model (its adaptor, if any, bypassed)."""
    adaptor = find_adaptor(model)
    return adaptor.bypassed() if adaptor is not None else nullcontext()


def _routing_accuracy(adaptor, tokenizer, facts: list[Fact], scores: Scores, model) -> None:
    fact_expert: dict[str, int] = {}
    for fact_id, expert in zip(adaptor.anchor_facts, adaptor.anchors.experts.tolist()):
        fact_expert[fact_id] = expert  # the newest expert holding the fact wins, as in routing

    def routed(prompts: list[str]) -> list[int]:
        if not prompts:
            return []
        keys = routing_keys(model, tokenizer, prompts)
        return [r.expert for r in adaptor.anchors.route(keys, [encode_prompt(tokenizer, p) for p in prompts])]

    own = [fact_expert.get(f.id, NO_EXPERT) for f in facts]
    edit_routes = routed([f.prompt for f in facts])
    scores.routing_edit = mean([float(r == o) for r, o in zip(edit_routes, own)])
    reph_own = [fact_expert.get(f.id, NO_EXPERT) for f in facts for _ in f.rephrases]
    reph_routes = routed([r for f in facts for r in f.rephrases])
    scores.routing_rephrase = mean([float(r == o) for r, o in zip(reph_routes, reph_own)])
    loc_routes = routed([loc.prompt for f in facts for loc in f.locality])
    scores.routing_locality = mean([float(r == NO_EXPERT) for r in loc_routes])
