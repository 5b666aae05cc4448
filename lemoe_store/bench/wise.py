"""WISE (Wang et al., NeurIPS 2024) as EasyEdit's reference implements WISE-Merge (easyeditor/models/wise):

- Memories: the output projection's weight W is the main memory and never moves. Edits train the side
  memory W' = W + Δ (Δ starts at zero) through a random gradient mask (each entry with probability 0.2,
  drawn at the start of each shard): SGD at lr 1.0 with weight decay 1e-5, up to 70 steps per edit (the
  reference's early stop: the loss changed by at most 1e-4 and is at most 0.02), W' kept within W ± 1.0.
- Loss of one edit: the target's NLL, the fact put behind the reference's context templates (the bare
  prompt and 10 texts the model writes itself from 5 starts, 5 and 10 tokens long), plus the activation
  margins on d = mean over tokens of ||silu(W a) - silu(W' a)|| (a: the projection's input), with one
  irrelevant prompt per edit: relu(d_irr - d_edit + γ) + relu(d_irr - α) + relu(β - d_edit).
- Shards and merging: after every 500 edits (save_freq) W' is saved and reset to W; after every 1000
  (merge_freq) the saved shards are TIES-merged relative to W (each task vector trimmed to its top 53 % by
  magnitude, a sign elected per entry by the weighted sum, the agreeing entries averaged) into the merged
  memory W_m; a later merge mixes the previous W_m in at weight 0.6. Before scoring, a shard pending past
  500 edits is saved and merged (the reference's final merge).
- Routing: d of W_m and of W' against W on the query; both below act_ratio (0.88) × the smallest d an edit
  had at the end of its training → the main memory answers; otherwise whichever memory moved further.
Deviations, each forced by this setting: routing averages d over the prompt's tokens and decides at
prefill (the reference averages every token it is given, the answer included, which free generation
cannot); d averages real tokens, not padding; the margins (5, 20, 10) are in units of a quarter of this
model's FFN output norm (the reference's values are for LLaMA-2-7B's scale).

WISE-Retrieve (`wise-retrieve`, the reference's `retrieve: True`, without replay as its defaults): every
saved shard stays a memory of its own, with its own threshold (act_ratio × the smallest d of its edits);
every 1,000 edits the last two are TIES-merged relative to W into one, whose threshold is the smaller of
theirs. A query reads W' when its d reaches W''s threshold, and instead a saved memory whose d is past
that memory's threshold and larger than W''s and any earlier pick; else the main memory. No final merge.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ..editing import EditConfig
from ..editing.adaptor import insert
from ..editing.batching import Pair, encode_pair, model_device, positions
from ..schemas.facts import Fact
from .base import (TEMPLATE_LENGTHS, TEMPLATE_STARTS, BenchSettings, Method, PlateauStop, ProjectionInputAdaptor,
                   TrainingBatch, reference_templates, train_answers)

MASK_RATIO = 0.2
ACT_RATIO = 0.88
EDIT_LR = 1.0
WEIGHT_DECAY = 1e-5
EDIT_STEPS = 70
NORM_CONSTRAINT = 1.0
SAVE_FREQ = 500
MERGE_FREQ = 1000
DENSITY = 0.53
LATER_MERGE_WEIGHT = 0.6  # the previous merged memory's weight in a later merge (the shards share 0.4)
# alpha (irrelevant below), beta (edits above), gamma (gap): the reference's 5 / 20 / 10, in units of a
# quarter of this model's typical FFN output norm at the layer.
MARGINS = (1.0, 4.0, 2.0)

MAIN = -1  # a row that reads the main memory (W alone); any other reading indexes `SideMemory.readable()`


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float = DENSITY) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) of task vectors, as EasyEdit's GTA('magnitude', 'sum', normalize):
    keep each vector's top `density` entries by magnitude, elect each entry's sign from the weighted sum,
    and divide the weighted sum of the agreeing entries by their total weight."""
    trimmed = []
    for delta in deltas:
        keep = int(density * delta.numel())
        if density < 1.0:
            mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
            mask[delta.abs().flatten().float().topk(keep).indices] = 1
            delta = delta * mask.view_as(delta)
        trimmed.append(delta)
    stacked = torch.stack(trimmed)
    scale = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked * scale
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (torch.sign(weighted) == majority).to(stacked.dtype)
    divisor = (scale * agree).sum(dim=0)
    return (weighted * agree).sum(dim=0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


class SideMemory(ProjectionInputAdaptor):
    """The MLP wrapped with WISE's memories, as deltas on the output projection: W' = W + current and
    W_m = W + merged; at prefill each row is given the one that answers it."""

    def __init__(self, base: nn.Module, hidden: int, config: EditConfig, layer: int) -> None:
        super().__init__(base, hidden, config, layer)
        weight = self.projection.weight
        self.current = nn.Parameter(torch.zeros_like(weight), requires_grad=False)
        self.merged = torch.zeros_like(weight)
        self.saved: list[torch.Tensor] = []  # shards waiting for the next merge
        self.gradient_mask = torch.zeros_like(weight)
        self.smallest_edit_distance = float("inf")
        self.training_tokens: torch.Tensor | None = None  # while an edit trains: its rows' real tokens; all read W'
        self.last_distances: torch.Tensor | None = None  # (B,) d of W' on each row, over its real tokens
        self._reading: torch.Tensor | None = None  # (B,) MAIN, or the index in `readable()` of what each row reads

    @staticmethod
    def distance(out: torch.Tensor, change: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) mean over `tokens` of ||silu(W a) - silu(W a + change)||: how far a memory moved the rows."""
        gap = (nn.functional.silu(out) - nn.functional.silu(out + change)).norm(dim=-1)
        weights = tokens.to(gap.dtype)
        return (gap * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def threshold(self) -> float:
        return ACT_RATIO * self.smallest_edit_distance

    def readable(self) -> list[torch.Tensor]:
        """The deltas a query may read, W' first."""
        return [self.current, self.merged]

    def route(self, gaps: torch.Tensor) -> torch.Tensor:
        """(B,) what each row reads, from (M, B) d of each of `readable()`: the memory that moved it
        furthest, unless both stay under the threshold."""
        current, merged = gaps
        quiet = (merged < self.threshold()) & (current < self.threshold())
        return torch.where(quiet, MAIN, torch.where(merged > current, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self._bypass:
            return out
        activation = self._activation
        if self.training_tokens is not None:
            current = activation @ self.current.T.to(out.dtype)
            self._prefill = None
            self.last_distances = self.distance(out, current, self.training_tokens)
            return out + current
        memories = self.readable()
        changes: list[torch.Tensor] | None = None  # at prefill each memory's change is computed once, for both uses
        if self._prefill is not None:
            prompt_mask, _ = self.prompt_layout()
            self._prefill = None
            changes = [activation @ memory.T.to(out.dtype) for memory in memories]
            self._reading = self.route(torch.stack([self.distance(out, change, prompt_mask) for change in changes]))
        if self._reading is None:
            return out
        for index, memory in enumerate(memories):
            rows = self._reading == index
            if bool(rows.any()):
                change = changes[index] if changes is not None else activation @ memory.T.to(out.dtype)
                out = torch.where(rows[:, None, None], out + change, out)
        return out


class RetrievalMemory(SideMemory):
    """WISE-Retrieve's memories: W' and every saved (or merged) memory, each with its own threshold."""

    def __init__(self, base: nn.Module, hidden: int, config: EditConfig, layer: int) -> None:
        super().__init__(base, hidden, config, layer)
        self.memories: list[torch.Tensor] = []
        self.memory_distances: list[float] = []  # each memory's smallest edit d, as `smallest_edit_distance`

    def readable(self) -> list[torch.Tensor]:
        return [self.current, *self.memories]

    def route(self, gaps: torch.Tensor) -> torch.Tensor:
        """The reference's order: W' if its d reaches its threshold; then each saved memory in turn takes
        the row if its d is past its own threshold and beyond the largest d so far (W''s included)."""
        reading = torch.where(gaps[0] >= self.threshold(), 0, MAIN)
        best = gaps[0]
        for index, distance in enumerate(self.memory_distances, start=1):
            wins = (gaps[index] > best) & (gaps[index] > ACT_RATIO * distance)
            reading = torch.where(wins, index, reading)
            best = torch.where(wins, gaps[index], best)
        return reading


class Wise(Method):
    name = "wise"
    lr = EDIT_LR
    resumable = True
    memory_class: type[SideMemory] = SideMemory
    own_settings = {"edit_lr": EDIT_LR, "weight_decay": WEIGHT_DECAY, "edit_steps": EDIT_STEPS, "mask_ratio": MASK_RATIO,
                    "act_ratio": ACT_RATIO, "norm_constraint": NORM_CONSTRAINT, "save_freq": SAVE_FREQ,
                    "merge_freq": MERGE_FREQ, "density": DENSITY, "later_merge_weight": LATER_MERGE_WEIGHT,
                    "template_starts": list(TEMPLATE_STARTS), "template_tokens": list(TEMPLATE_LENGTHS),
                    "margins_in_quarter_ffn_norms": list(MARGINS),
                    "optimizer": "sgd"}

    def __init__(self, model, tokenizer, settings: BenchSettings, irrelevant: list[Pair] | None = None) -> None:
        super().__init__(model, tokenizer, settings)
        config = EditConfig(layer=settings.layer)
        self.templates = reference_templates(model, tokenizer)
        self.memory = insert(model, lambda mlp, hidden: self.memory_class(mlp, hidden, config, settings.layer), settings.layer)
        self.irrelevant = irrelevant or []
        self.random = random.Random(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.edits = 0
        self.steps = BenchSettings(settings.layer, EDIT_STEPS, settings.loss_floor, settings.seed)
        self.unit = self._ffn_output_norm() / 4
        self.bytes_added = 2 * self.memory.current.numel() * 4  # W' and the merged W_m (the shards merge away)

    @torch.no_grad()
    def _ffn_output_norm(self) -> float:
        """Mean norm of the FFN's output over the tokens of (up to 32) irrelevant prompts."""
        sample = self.irrelevant[:32]
        if not sample:
            return 20.0  # no reference prompts: the paper's beta as the scale
        recorded: list[torch.Tensor] = []
        handle = self.memory.base.register_forward_hook(lambda _m, _a, out: recorded.append(out))
        try:
            data = TrainingBatch.build(self.tokenizer, sample, model_device(self.model))
            with self.memory.bypassed():
                self.model(input_ids=data.ids, attention_mask=data.mask, position_ids=positions(data.mask))
        finally:
            handle.remove()
        return float(recorded[0].norm(dim=-1)[data.mask.bool()].mean())

    def model_for_eval(self) -> nn.Module:
        """The reference's final merge, once SAVE_FREQ edits are in: W' joins the saved shards if it holds
        edits, and whatever is saved is merged (at T = 500 the shard saved by the last edit, W' being empty)."""
        if self.edits >= SAVE_FREQ:
            if bool(self.memory.current.any()):
                self._save_shard()
            self._merge()
        return self.model

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        memory = self.memory
        tensors = {"current": memory.current.detach(), "merged": memory.merged, "gradient_mask": memory.gradient_mask,
                   "generator": self.generator.get_state()}
        tensors |= {f"saved.{i}": shard for i, shard in enumerate(memory.saved)}
        values = {"edits": self.edits, "smallest_edit_distance": memory.smallest_edit_distance,
                  "saved": len(memory.saved), "random": self.random.getstate()}
        return tensors, values

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        memory = self.memory
        device = memory.current.device
        with torch.no_grad():
            memory.current.copy_(tensors["current"])
        memory.merged = tensors["merged"].to(device)
        memory.gradient_mask = tensors["gradient_mask"].to(device)
        memory.saved = [tensors[f"saved.{i}"].to(device) for i in range(values["saved"])]
        memory.smallest_edit_distance = values["smallest_edit_distance"]
        self.generator.set_state(tensors["generator"])
        version, internal, gauss = values["random"]  # JSON gave lists back: random wants tuples
        self.random.setstate((version, tuple(internal), gauss))
        self.edits = values["edits"]

    def edit(self, batch: list[Fact]) -> None:
        for fact in batch:  # one edit at a time, as the reference's sequential editing
            if self.edits % SAVE_FREQ == 0:
                self._new_gradient_mask()
            self._edit_one(fact)
            self.edits += 1
            if self.edits % SAVE_FREQ == 0:
                self._save_shard()
            if self.edits % MERGE_FREQ == 0:
                self._merge()

    def _new_gradient_mask(self) -> None:
        memory = self.memory
        drawn = torch.rand(memory.gradient_mask.shape, generator=self.generator) < MASK_RATIO
        memory.gradient_mask = drawn.to(memory.gradient_mask.device, memory.gradient_mask.dtype)

    def _save_shard(self) -> None:
        memory = self.memory
        memory.saved.append(memory.current.detach().clone())
        with torch.no_grad():
            memory.current.zero_()

    def _merge(self) -> None:
        memory = self.memory
        if not memory.saved:
            return
        shards = len(memory.saved)
        if bool(memory.merged.any()):
            deltas, weights = memory.saved + [memory.merged], [0.4 / shards] * shards + [LATER_MERGE_WEIGHT]
        else:
            deltas, weights = memory.saved, [1.0 / shards] * shards
        memory.merged = ties_merge(deltas, weights)
        memory.saved = []

    def _edit_one(self, fact: Fact) -> None:
        memory = self.memory
        rows = [encode_pair(self.tokenizer, template + fact.prompt, fact.target) for template in self.templates]
        unrelated = [self.random.choice(self.irrelevant)] if self.irrelevant else []
        data = TrainingBatch.build(self.tokenizer, rows + unrelated, model_device(self.model))
        edits = len(rows)
        alpha, beta, gamma = (margin * self.unit for margin in MARGINS)
        weight = memory.projection.weight

        def margin_loss() -> torch.Tensor:
            d = memory.last_distances
            d_edit, d_irr = d[:edits], d[edits:]
            loss = torch.relu(beta - d_edit).mean()
            if len(d_irr):
                loss = loss + torch.relu(d_irr - alpha).mean() + torch.relu(d_irr[:, None] - d_edit[None, :] + gamma).mean()
            return loss

        def mask_gradient() -> None:
            memory.current.grad *= memory.gradient_mask
            memory.current.grad += WEIGHT_DECAY * (weight + memory.current.detach())  # SGD's decay acts on W'

        def constrain() -> None:
            with torch.no_grad():
                memory.current.clamp_(-NORM_CONSTRAINT, NORM_CONSTRAINT)

        memory.current.requires_grad_(True)
        memory.training_tokens = data.mask
        try:
            train_answers(self.model, data, [memory.current], self.steps, lr=self.lr, optimizer="sgd",
                          extra_loss=margin_loss, before_step=mask_gradient, after_step=constrain, rows=edits,
                          stop_when=PlateauStop())
        finally:
            memory.training_tokens = None
            memory.current.requires_grad_(False)
        # as the reference: the edit rows' d at the last step's forward sets the routing threshold
        memory.smallest_edit_distance = min(memory.smallest_edit_distance, float(memory.last_distances[:edits].detach().mean()))


class WiseRetrieve(Wise):
    """WISE-Retrieve: the saved shards stay apart, each read on its own threshold (module docstring)."""

    name = "wise-retrieve"
    memory_class = RetrievalMemory
    own_settings = {**Wise.own_settings, "retrieve": True, "replay": False}

    def __init__(self, model, tokenizer, settings: BenchSettings, irrelevant: list[Pair] | None = None) -> None:
        super().__init__(model, tokenizer, settings, irrelevant)
        self._count_bytes()

    def _count_bytes(self) -> None:
        """W' and every saved memory, each a copy of the layer's weight."""
        self.bytes_added = (1 + len(self.memory.memories)) * self.memory.current.numel() * 4

    def model_for_eval(self) -> nn.Module:
        return self.model  # the reference merges nothing before scoring in retrieve mode

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, values = super().state()
        tensors |= {f"memories.{i}": memory for i, memory in enumerate(self.memory.memories)}
        return tensors, values | {"memory_distances": self.memory.memory_distances}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        super().load_state(tensors, values)
        memory = self.memory
        memory.memory_distances = list(values["memory_distances"])
        memory.memories = [tensors[f"memories.{i}"].to(memory.current.device) for i in range(len(memory.memory_distances))]
        self._count_bytes()

    def _save_shard(self) -> None:
        memory = self.memory
        memory.memories.append(memory.current.detach().clone())
        memory.memory_distances.append(memory.smallest_edit_distance)
        memory.smallest_edit_distance = float("inf")  # W''s threshold starts again with the next shard
        with torch.no_grad():
            memory.current.zero_()
        self._count_bytes()

    def _merge(self) -> None:
        """The last MERGE_FREQ / SAVE_FREQ memories become one, by TIES relative to W at equal weights."""
        memory, count = self.memory, MERGE_FREQ // SAVE_FREQ
        if len(memory.memories) < count:
            return
        merged = ties_merge(memory.memories[-count:], [1.0 / count] * count)
        distance = min(memory.memory_distances[-count:])
        memory.memories[-count:] = [merged]
        memory.memory_distances[-count:] = [distance]
        self._count_bytes()
