"""GRACE (Hartvigsen et al., NeurIPS 2023): a key-value codebook at one layer with deferral radii.

Keys are the MLP input at the last prompt token; a query within the radius eps of its nearest key gets that
entry's value in place of the MLP output (from the last prompt token on; decided at prefill and kept for
generated tokens), otherwise the layer is untouched. Editing a fact:
- no key within eps_nearest + eps_init: add an entry (key, value, eps_init);
- the nearest entry's balls overlap and it has the same answer: expand its radius to reach the new key;
- ... and a different answer: split, both radii become half the distance, and the new entry is added.
New values start from the MLP's own output (GRACE's warm start) and are trained (Adam, lr 1.0, early
stop) until the target is the argmax, within the same step budget as every method (the paper: 100). eps_init is scaled to this model (see EPS_INIT).
"""

from __future__ import annotations

import torch
from torch import nn

from ..editing import EditConfig, LemoeAdaptor
from ..editing.adaptor import RoutingDecision, insert
from ..editing.batching import encode_prompt, left_pad, model_device, positions
from ..editing.routing import NO_EXPERT
from ..schemas.facts import Fact
from .base import BenchSettings, Method, TrainingBatch, train_answers

# The paper's eps_init = 1.0 is for other models' hidden states. Here keys (SmolLM2's layer-18 MLP input, after
# its norm) have norm ~3.5; on 200 train-split facts every rephrase lies within 3.0 of its prompt's key and no
# locality prompt within 3.0 of any edit's key (at 4.0: 62% of them), so 3.0 is the largest safe radius.
EPS_INIT = 3.0


class Codebook(LemoeAdaptor):
    """GRACE's adaptor: routing by Euclidean distance to a key within its radius; values replace the MLP."""

    def __init__(self, base: nn.Module, hidden: int, config: EditConfig, layer: int) -> None:
        super().__init__(base, hidden, config, layer)
        reference = self.base_parameter()
        self.keys = torch.empty(0, hidden, device=reference.device, dtype=torch.float32)
        self.values = torch.empty(0, hidden, device=reference.device, dtype=reference.dtype)
        self.radii = torch.empty(0, device=reference.device, dtype=torch.float32)
        self.answers: list[str] = []
        self.training_values: tuple[int, nn.Parameter] | None = None  # (first entry index, trainable values)
        self.last_queries: torch.Tensor | None = None
        self.last_outputs: torch.Tensor | None = None

    def _route_prefill(self, x: torch.Tensor) -> RoutingDecision:
        _, last = self.prompt_layout()
        rows = torch.arange(x.shape[0], device=x.device)
        self.last_queries = x[rows, last].detach().float()
        self.last_outputs = self.base(x[rows, last]).detach()
        experts = torch.full((x.shape[0],), NO_EXPERT, dtype=torch.long, device=x.device)
        if len(self.keys):
            distance, nearest = torch.cdist(self.last_queries, self.keys).min(dim=1)
            experts = torch.where(distance <= self.radii[nearest], nearest, experts)
        return RoutingDecision(experts, last)

    def _value_rows(self, entries: torch.Tensor) -> torch.Tensor:
        values = self.values
        if self.training_values is not None:
            values = torch.cat([values[: self.training_values[0]], self.training_values[1]])
        return values[entries]

    def _apply(self, x: torch.Tensor, out: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        routed = decision.experts != NO_EXPERT
        if not bool(routed.any()):
            return out
        position = torch.arange(x.shape[1], device=x.device)
        active = (position[None, :] >= decision.start[:, None]) & routed[:, None]
        values = self._value_rows(decision.experts.clamp(min=0)).to(out.dtype)
        return torch.where(active.unsqueeze(-1), values[:, None, :].expand_as(out), out)


class Grace(Method):
    name = "grace"
    lr = 1.0
    own_settings = {"lr": lr, "eps_init": EPS_INIT, "optimizer": "adam"}

    def __init__(self, model, tokenizer, settings: BenchSettings) -> None:
        super().__init__(model, tokenizer, settings)
        self.codebook = insert(model, lambda mlp, hidden: Codebook(mlp, hidden, EditConfig(layer=settings.layer),
                                                                  settings.layer), settings.layer)

    @torch.no_grad()
    def _queries(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, MLP outputs) at the last token of each prompt, as the codebook's prefill records them."""
        rows = [encode_prompt(self.tokenizer, p) for p in prompts]
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id, model_device(self.model))
        self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        return self.codebook.last_queries, self.codebook.last_outputs

    def edit(self, batch: list[Fact]) -> None:
        book = self.codebook
        keys, outputs = self._queries([f.prompt for f in batch])
        first_new = len(book.keys)
        trained: list[Fact] = []
        for fact, key, output in zip(batch, keys, outputs):
            radius = EPS_INIT
            if len(book.keys):
                distance, nearest = torch.cdist(key[None], book.keys)[0].min(dim=0)
                distance, nearest = float(distance), int(nearest)
                if distance <= float(book.radii[nearest]) + EPS_INIT:
                    if book.answers[nearest] == fact.target:
                        book.radii[nearest] = max(float(book.radii[nearest]), distance)  # expand
                        continue
                    book.radii[nearest] = radius = distance / 2  # split
            book.keys = torch.cat([book.keys, key[None]])
            book.values = torch.cat([book.values, output[None].to(book.values.dtype)])
            book.radii = torch.cat([book.radii, torch.tensor([radius], device=book.radii.device)])
            book.answers.append(fact.target)
            trained.append(fact)
        if not trained:
            return
        values = nn.Parameter(book.values[first_new:].clone())
        book.training_values = (first_new, values)
        entries = torch.arange(first_new, len(book.keys), device=values.device)
        data = TrainingBatch.of_facts(self.tokenizer, trained, model_device(self.model))
        with book.forced(RoutingDecision(entries, data.ids.shape[1] - 1 - (data.labels != -100).sum(dim=1))):
            train_answers(self.model, data, [values], self.settings, lr=self.lr)
        book.values = torch.cat([book.values[:first_new], values.detach()])
        book.training_values = None
        self.bytes_added += len(trained) * (2 * book.hidden + 1) * 4
