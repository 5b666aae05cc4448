"""MEMOIR (Wang et al., NeurIPS 2025): a residual memory beside one FFN's output projection, written through
sparse, sample-dependent masks and read only for queries whose mask overlaps an edit's. As the reference
(EasyEdit's `easyeditor/models/memoir/MEMOIR.py`) implements it:

- Residual memory: W_m (hidden x D, zero at the start) beside the output projection W, so the layer gives
  W a + W_m (M ⊙ a), where a is the projection's input (D = the FFN's inner width) and M a binary mask.
- TopHash mask of a prompt: its activations a averaged over the prompt's tokens, minus the background
  (the same average over irrelevant prompts: `mean_decentered`); the k entries largest in magnitude; then
  one fixed random permutation of the D coordinates moves those k positions, so an edit writes columns
  spread over the memory rather than the few strongest features. k = 0.2857 D (the reference's 4096 of
  LLaMA-3-8B's 14336).
- Editing: one fact at a time (a batch is edited fact by fact), the fact's mask (from its bare prompt) on
  every position of every row: the prompt alone and behind the 10 context templates (`reference_templates`),
  the target's NLL, SGD at lr 1.0 with weight decay 1e-5 and the gradient clipped to norm 1.0, at most 30
  steps (`edit_lr`, `n_iter`) with the reference's plateau stop. Only the masked columns get gradient, so
  edits with disjoint masks cannot overwrite each other.
- Inference: the query's mask (prompt tokens) against every stored edit mask; if the largest overlap
  |M_q ∩ M_e| / k reaches τ, the memory reads the whole sequence through the *matched edit's* mask, else the
  layer is untouched: the base model's logits, exactly. τ = 0.6, chosen on the tuning splits
  (benchmarks/memoir_threshold.py at a486b04, ZsRE train and CounterFact 0-99, T = 100: the best mean of
  Rel / Gen / Loc over both); the reference's 0.4 (`irr_threshold`, LLaMA-3-8B's 14,336-wide FFN) lets
  every locality prompt of both splits read the memory of this 1,536-wide one.
Deviation, forced by free generation: the mask is taken once, at prefill, from the prompt's tokens (the
reference is given the last prompt position of a teacher-forced sequence).
"""

from __future__ import annotations

import torch
from torch import nn

from ..editing import EditConfig
from ..editing.adaptor import insert
from ..editing.batching import Pair, encode_pair, encode_prompt, left_pad, model_device, positions
from ..schemas.facts import Fact
from .base import (TEMPLATE_LENGTHS, TEMPLATE_STARTS, BenchSettings, Method, PlateauStop, ProjectionInputAdaptor,
                   TrainingBatch, reference_templates, train_answers)

TOP_K_SHARE = 4096 / 14336
OVERLAP_THRESHOLD = 0.6
EDIT_LR = 1.0
EDIT_STEPS = 30
WEIGHT_DECAY = 1e-5
GRADIENT_NORM = 1.0
BACKGROUND_PROMPTS = 100


class ResidualMemory(ProjectionInputAdaptor):
    """The MLP wrapped with MEMOIR's memory; routing is by mask overlap, decided at prefill."""

    def __init__(self, base: nn.Module, hidden: int, config: EditConfig, layer: int, seed: int) -> None:
        super().__init__(base, hidden, config, layer)
        weight = self.projection.weight
        inner, device = weight.shape[1], weight.device
        self.residual = nn.Parameter(torch.zeros_like(weight), requires_grad=False)  # W_m
        self.k = max(1, round(TOP_K_SHARE * inner))
        self.threshold = OVERLAP_THRESHOLD
        self.permutation = torch.randperm(inner, generator=torch.Generator().manual_seed(seed)).to(device)
        self.background = torch.zeros(inner, device=device)
        self.edit_masks = torch.zeros(0, inner, dtype=torch.bool, device=device)
        self.training_mask: torch.Tensor | None = None  # (inner,) while an edit is written
        self.last_masks: torch.Tensor | None = None
        self.last_overlaps: torch.Tensor | None = None
        self.last_matches: torch.Tensor | None = None  # (B,) the stored edit each prompt overlaps most
        self._reading: tuple[torch.Tensor, torch.Tensor] | None = None  # (masks, rows that read the memory)

    def masks(self, activation: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """TopHash masks (B, D) of the rows' prompts."""
        weights = prompt_mask.to(torch.float32).unsqueeze(-1)
        mean = (activation.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        top = (mean - self.background).abs().topk(self.k, dim=-1).indices
        masks = torch.zeros_like(mean, dtype=torch.bool)
        return masks.scatter_(1, self.permutation[top], True)

    def overlaps(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) the largest share of each mask's k positions that one stored edit mask also has, and (B,)
        that edit's index."""
        if not len(self.edit_masks):
            zeros = torch.zeros(masks.shape[0], device=masks.device)
            return zeros, zeros.long()
        best = (masks.float() @ self.edit_masks.float().T).max(dim=1)
        return best.values / self.k, best.indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self._bypass:
            return out
        if self.training_mask is not None:
            self._prefill = None
            rows = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            self._reading = (self.training_mask.expand(x.shape[0], -1), rows)
        elif self._prefill is not None:
            prompt_mask, _ = self.prompt_layout()
            self._prefill = None
            self.last_masks = self.masks(self._activation, prompt_mask)
            self.last_overlaps, self.last_matches = self.overlaps(self.last_masks)
            reads = self.last_overlaps >= self.threshold
            self._reading = (self.edit_masks[self.last_matches] if bool(reads.any()) else self.last_masks, reads)
        if self._reading is None or not bool(self._reading[1].any()):
            return out
        masks, rows = self._reading
        residual = (self._activation * masks[:, None, :].to(self._activation.dtype)) @ self.residual.T.to(out.dtype)
        return torch.where(rows[:, None, None], out + residual, out)


class Memoir(Method):
    name = "memoir"
    lr = EDIT_LR
    resumable = True
    own_settings = {"top_k_share": TOP_K_SHARE, "overlap_threshold": OVERLAP_THRESHOLD, "edit_lr": EDIT_LR,
                    "edit_steps": EDIT_STEPS, "weight_decay": WEIGHT_DECAY, "gradient_norm": GRADIENT_NORM,
                    "template_starts": list(TEMPLATE_STARTS), "template_tokens": list(TEMPLATE_LENGTHS),
                    "background_prompts": BACKGROUND_PROMPTS, "optimizer": "sgd"}

    def __init__(self, model, tokenizer, settings: BenchSettings, irrelevant: list[Pair] | None = None) -> None:
        super().__init__(model, tokenizer, settings)
        config = EditConfig(layer=settings.layer)
        self.templates = reference_templates(model, tokenizer)
        self.memory = insert(model, lambda mlp, hidden: ResidualMemory(mlp, hidden, config, settings.layer,
                                                                        settings.seed), settings.layer)
        self.steps = BenchSettings(settings.layer, min(EDIT_STEPS, settings.max_steps), settings.loss_floor,
                                   settings.seed)
        self.memory.background = self._mean_activation([pair.prompt for pair in (irrelevant or [])[:BACKGROUND_PROMPTS]])
        self.bytes_added = self.memory.residual.numel() * 4  # the memory: one dense matrix, as WISE's side memory

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        memory = self.memory
        return {"residual": memory.residual.detach(), "edit_masks": memory.edit_masks}, {"bytes": self.bytes_added}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        memory = self.memory
        with torch.no_grad():
            memory.residual.copy_(tensors["residual"])
        memory.edit_masks = tensors["edit_masks"].to(memory.edit_masks.device, torch.bool)
        self.bytes_added = values["bytes"]

    def _clip_and_decay(self) -> None:
        """The reference's step: the gradient clipped to norm 1, then SGD's weight decay on W_m."""
        residual = self.memory.residual
        nn.utils.clip_grad_norm_(residual, max_norm=GRADIENT_NORM)
        residual.grad.add_(residual.detach(), alpha=WEIGHT_DECAY)

    @torch.no_grad()
    def _prompt_masks(self, rows: list[list[int]]) -> torch.Tensor:
        """TopHash masks of prompts (token ids), as a query's prefill computes them."""
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id, model_device(self.model))
        self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        return self.memory.last_masks

    @torch.no_grad()
    def _mean_activation(self, rows: list[list[int]]) -> torch.Tensor:
        """The background: the output projection's input averaged over the tokens of irrelevant prompts."""
        if not rows:
            return self.memory.background
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id, model_device(self.model))
        with self.memory.bypassed():
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        tokens = mask.bool()
        return self.memory._activation[tokens].float().mean(dim=0)

    def edit(self, batch: list[Fact]) -> None:
        memory = self.memory
        masks = self._prompt_masks([encode_prompt(self.tokenizer, f.prompt) for f in batch])
        device = model_device(self.model)
        memory.residual.requires_grad_(True)
        try:
            for fact, mask in zip(batch, masks):
                rows = [encode_pair(self.tokenizer, template + fact.prompt, fact.target) for template in self.templates]
                data = TrainingBatch.build(self.tokenizer, rows, device)
                memory.training_mask = mask
                try:
                    train_answers(self.model, data, [memory.residual], self.steps, lr=self.lr, optimizer="sgd",
                                  before_step=self._clip_and_decay, stop_when=PlateauStop())
                finally:
                    memory.training_mask = None
                memory.edit_masks = torch.cat([memory.edit_masks, mask[None]])
        finally:
            memory.residual.requires_grad_(False)
        self.bytes_added += len(batch) * memory.k * 4  # each edit's mask, as k indices
