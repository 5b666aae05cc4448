"""Rel / Gen / Loc (EasyEdit definitions) and routing accuracy of an edited model.

Rel: teacher-forced token accuracy of the new target after the edit prompt.
Gen: the same after each rephrase.
Loc: share of the locality answer's tokens whose argmax is unchanged from the base model's
     (the base model = the same model with the adaptor bypassed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..schemas.facts import Fact
from .adaptor import find_adaptor
from .batching import Pair, encode_pair, routing_keys, teacher_forced_predictions, token_accuracy
from .routing import NO_EXPERT


@dataclass
class Scores:
    rel: float
    gen: float | None
    loc: float | None
    facts: int
    routing_edit: float | None = None  # share of edit prompts routed to their own expert
    routing_rephrase: float | None = None  # share of rephrases routed to their fact's expert
    routing_locality: float | None = None  # share of locality prompts routed to no expert

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @property
    def mean(self) -> float:
        values = [v for v in (self.rel, self.gen, self.loc) if v is not None]
        return sum(values) / len(values)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def evaluate(model, tokenizer, facts: list[Fact], batch_size: int = 16,
             base_locality: list[list[int]] | None = None) -> Scores:
    """Score `facts` on the model as it is (with whatever experts its adaptor holds).

    Loc compares with the base model's predictions: the adaptor bypassed, or `base_locality` (from
    `locality_predictions` on the unedited model) for editors that change the weights themselves.
    """
    adaptor = find_adaptor(model)
    edit_pairs = [encode_pair(tokenizer, f.prompt, f.target) for f in facts]
    rephrase_pairs = [(i, encode_pair(tokenizer, r, f.target)) for i, f in enumerate(facts) for r in f.rephrases]
    loc_pairs = locality_pairs(tokenizer, facts)

    def accuracy(pairs: list[Pair], predictions: list[list[int]]) -> list[float]:
        return [token_accuracy(pred, pair.answer) for pair, pred in zip(pairs, predictions)]

    rel = accuracy(edit_pairs, teacher_forced_predictions(model, tokenizer, edit_pairs, batch_size))
    reph = [p for _, p in rephrase_pairs]
    gen = accuracy(reph, teacher_forced_predictions(model, tokenizer, reph, batch_size))
    loc: list[float] = []
    if loc_pairs:
        after = teacher_forced_predictions(model, tokenizer, loc_pairs, batch_size)
        before = base_locality if base_locality is not None else base_predictions(model, tokenizer, loc_pairs, batch_size)
        loc = [token_accuracy(a, b) for a, b in zip(after, before)]
    scores = Scores(rel=_mean(rel) or 0.0, gen=_mean(gen), loc=_mean(loc), facts=len(facts))
    if adaptor is not None and adaptor.anchor_facts:  # routed by anchors (not a peer editor's own router)
        _routing_accuracy(adaptor, tokenizer, facts, scores, model)
    return scores


def locality_pairs(tokenizer, facts: list[Fact]) -> list[Pair]:
    """Every locality prompt of `facts`, in order, with its expected answer."""
    return [encode_pair(tokenizer, loc.prompt, loc.answer) for f in facts for loc in f.locality]


def locality_predictions(model, tokenizer, facts: list[Fact], batch_size: int = 16) -> list[list[int]]:
    """The base model's teacher-forced predictions on `facts`' locality prompts (for `evaluate`)."""
    return base_predictions(model, tokenizer, locality_pairs(tokenizer, facts), batch_size)


def base_predictions(model, tokenizer, pairs: list[Pair], batch_size: int = 16) -> list[list[int]]:
    """Teacher-forced predictions of the base model: the adaptor (if any) routes nothing."""
    adaptor = find_adaptor(model)
    if adaptor is None:
        return teacher_forced_predictions(model, tokenizer, pairs, batch_size)
    with adaptor.bypassed():
        return teacher_forced_predictions(model, tokenizer, pairs, batch_size)


def _routing_accuracy(adaptor, tokenizer, facts: list[Fact], scores: Scores, model) -> None:
    fact_expert: dict[str, int] = {}
    for fact_id, expert in zip(adaptor.anchor_facts, adaptor.anchors.experts.tolist()):
        fact_expert[fact_id] = expert  # the newest expert holding the fact wins, as in routing

    def routed(prompts: list[str]) -> list[int]:
        if not prompts:
            return []
        keys = routing_keys(model, tokenizer, prompts)
        return [r.expert for r in adaptor.anchors.route(keys)]

    own = [fact_expert.get(f.id, NO_EXPERT) for f in facts]
    edit_routes = routed([f.prompt for f in facts])
    scores.routing_edit = _mean([float(r == o) for r, o in zip(edit_routes, own)])
    reph_own = [fact_expert.get(f.id, NO_EXPERT) for f in facts for _ in f.rephrases]
    reph_routes = routed([r for f in facts for r in f.rephrases])
    scores.routing_rephrase = _mean([float(r == o) for r, o in zip(reph_routes, reph_own)])
    loc_routes = routed([loc.prompt for f in facts for loc in f.locality])
    scores.routing_locality = _mean([float(r == NO_EXPERT) for r in loc_routes])
