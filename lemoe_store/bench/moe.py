"""A conventional MoE adaptor: the same experts beside the same MLP, but routed by a learned softmax
top-1 router over the prompt's key (read at LEMoE's key layer, as its anchors are) instead of KV anchors,
and trained end to end.

- `moe` (the paper's own baseline): no expert is frozen; the router and every expert may change on each
  batch (an earlier expert changes when the new batch's prompts are routed to it).
- `lemoe-learned-router` (ablation "without KV anchor routing"): earlier experts frozen as in LEMoE, the
  router learned. Under KV anchor routing freezing cannot be ablated on its own: training routes a batch's
  prompts only to its new expert, so earlier experts get no gradient either way; `moe` against
  `lemoe-learned-router` is the freezing ablation of the learned-router design.

Each batch appends one expert and one router row; training minimises the answers' NLL plus the router's
cross-entropy towards the new expert for the batch's prompts (a router has no other signal to send new
facts to new capacity). Every query goes to some expert: a softmax router has no "none" choice.
"""

from __future__ import annotations

import torch
from torch import nn

from ..editing import EditConfig, LemoeAdaptor
from ..editing.adaptor import RoutingDecision, decoder_layers, insert
from ..editing.batching import model_device, positions
from ..schemas.facts import Fact
from .base import BenchSettings, Method, TrainingBatch, train_answers


class RoutedByRouter(LemoeAdaptor):
    """The LEMoE adaptor's experts, routed top-1 by softmax(router · key)."""

    def __init__(self, base: nn.Module, hidden: int, config: EditConfig, layer: int, key_layer: int) -> None:
        super().__init__(base, hidden, config, layer, key_layer)
        self.router = nn.ParameterList()
        self.router_logits: torch.Tensor | None = None
        self.fixed_keys: torch.Tensor | None = None  # while training replays the layers below this one

    def add_routed_expert(self) -> int:
        index = self.add_expert(rank=self.config.rank)
        reference = self.base_parameter()
        self.router.append(nn.Parameter(torch.zeros(self.hidden, device=reference.device, dtype=torch.float32)))
        return index

    def _route_prefill(self, x: torch.Tensor) -> RoutingDecision:
        prompt_mask, last_prompt_token = self.prompt_layout()
        self.last_keys = self.prefill_keys(x, prompt_mask) if self.fixed_keys is None else self.fixed_keys
        self.router_logits = self.last_keys @ torch.stack(list(self.router)).T * self.hidden**0.5
        gates, experts = torch.softmax(self.router_logits, dim=-1).max(dim=-1)
        return RoutingDecision(experts, last_prompt_token, gates, self.last_keys)


class LearnedRouterMoE(Method):
    name = "moe"
    freeze = False
    lr = 3e-2
    own_settings = {"lr": lr, "rank": EditConfig.rank, "key_layer": "LEMoE's", "optimizer": "adam"}

    def __init__(self, model, tokenizer, settings: BenchSettings) -> None:
        super().__init__(model, tokenizer, settings)
        self.config = EditConfig(layer=settings.layer, seed=settings.seed)
        # LEMoE's key layer, so `lemoe-learned-router` against LEMoE changes the router alone.
        key_layer = self.config.resolved_key_layer(len(decoder_layers(model)))
        self.adaptor = insert(model, lambda mlp, hidden: RoutedByRouter(mlp, hidden, self.config, settings.layer,
                                                                        key_layer), settings.layer)

    def edit(self, batch: list[Fact]) -> None:
        torch.manual_seed(self.settings.seed + len(self.adaptor.experts))
        new = self.adaptor.add_routed_expert()
        experts = [self.adaptor.experts[new]] if self.freeze else list(self.adaptor.experts)
        parameters = [p for e in experts for p in e.parameters()] + list(self.adaptor.router)
        for p in parameters:
            p.requires_grad_(True)
        target = torch.full((len(batch),), new, dtype=torch.long, device=model_device(self.model))

        def router_loss() -> torch.Tensor:
            return nn.functional.cross_entropy(self.adaptor.router_logits, target)

        rows = TrainingBatch.of_facts(self.tokenizer, batch, model_device(self.model))
        # Training replays the layers below the adaptor, the key layer among them: read the keys once.
        with torch.no_grad(), self.adaptor.teacher_forcing(rows.prompt_lengths):
            self.model(input_ids=rows.ids, attention_mask=rows.mask, position_ids=positions(rows.mask),
                       logits_to_keep=1)
        self.adaptor.fixed_keys = self.adaptor.last_keys
        try:
            train_answers(self.model, rows, parameters, self.settings, lr=self.lr, extra_loss=router_loss)
        finally:
            self.adaptor.fixed_keys = None
        for p in parameters:
            p.requires_grad_(False)
        expert_bytes = sum(p.numel() * p.element_size() for p in self.adaptor.experts[new].parameters())
        self.bytes_added += expert_bytes + self.adaptor.hidden * 4


class LearnedRouterFrozenExperts(LearnedRouterMoE):
    name = "lemoe-learned-router"
    freeze = True
