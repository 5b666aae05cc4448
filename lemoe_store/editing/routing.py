"""KV anchor routing: query keys are matched against the anchor keys of every expert with FAISS.

(`PaperRouter`, at the end, is the LEMoE paper's own variant, kept for the ablation: one learned key per
expert, a learned query projection, top-1 softmax and no "none" choice.)

A key is the mean, over the prompt tokens (the first token left out: Llama-family models park huge
activations there, which makes every prompt look alike), of the MLP input at the key layer (an early one, see
`EditConfig.key_layer`), L2-normalised.
The nearest anchor by cosine similarity decides the expert; below the threshold no expert is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

NO_EXPERT = -1
_TIE = 1e-6  # similarities this close count as a tie: the newest expert wins (a later edit overwrites)


def prompt_keys(x: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Keys (B, H) from MLP inputs `x` (B, T, H) and a bool mask (B, T) of each row's prompt tokens."""
    mask = prompt_mask.clone()
    first = mask.float().argmax(dim=1)
    has_more = mask.sum(dim=1) > 1
    rows = torch.arange(mask.shape[0], device=mask.device)
    mask[rows[has_more], first[has_more]] = False  # drop the attention-sink token when there is another
    weights = mask.to(torch.float32).unsqueeze(-1)
    mean = (x.to(torch.float32) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


@dataclass(frozen=True)
class Route:
    """The routing decision for one query: expert index (or NO_EXPERT), best similarity, anchor row."""

    expert: int
    similarity: float
    anchor: int


class AnchorIndex:
    """Anchor keys of all active experts in a FAISS inner-product index (keys are unit vectors)."""

    def __init__(self, dim: int, threshold: float) -> None:
        self.dim = dim
        self.threshold = threshold
        self.index = faiss.IndexFlatIP(dim)
        self.experts = np.zeros(0, dtype=np.int64)  # anchor row -> expert index

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, keys: torch.Tensor | np.ndarray, expert: int) -> None:
        array = keys.detach().cpu().float().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys, np.float32)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"anchor keys must have shape (n, {self.dim}), got {array.shape}")
        self.index.add(array)
        self.experts = np.concatenate([self.experts, np.full(len(array), expert, dtype=np.int64)])

    def search(self, keys: torch.Tensor, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, anchor rows) for each key; rows are -1 where fewer anchors exist."""
        query = np.ascontiguousarray(keys.detach().cpu().float().numpy())
        return self.index.search(query, min(k, max(len(self), 1)))

    def matched_keys(self, keys: torch.Tensor, routes: list[Route]) -> torch.Tensor:
        """`keys` with each routed row's key replaced by the anchor key it matched (what its expert was
        trained on); rows routed to no expert keep their own."""
        rows = [i for i, r in enumerate(routes) if r.expert != NO_EXPERT]
        if not rows:
            return keys
        stored = self.index.reconstruct_batch(np.array([routes[i].anchor for i in rows], dtype=np.int64))
        matched = keys.clone()
        matched[rows] = torch.from_numpy(stored).to(keys.device, keys.dtype)
        return matched

    def route(self, keys: torch.Tensor) -> list[Route]:
        if len(self) == 0:
            return [Route(NO_EXPERT, float("-inf"), -1) for _ in range(keys.shape[0])]
        sims, rows = self.search(keys)
        routes = []
        for row_sims, row_ids in zip(sims, rows):
            best = row_sims[0]
            tied = [(self.experts[a], a) for s, a in zip(row_sims, row_ids) if a >= 0 and s >= best - _TIE]
            expert, anchor = max(tied)
            routes.append(Route(int(expert) if best >= self.threshold else NO_EXPERT, float(best), int(anchor)))
        return routes


class PaperRouter(torch.nn.Module):
    """The LEMoE paper's KV anchor routing: the query is a learned projection of the prompt's pooled key,
    every expert owns one learned key vector, and the top-1 softmax over scaled cosine similarities picks
    the expert (its probability weights the expert's output). Training an expert trains its key and the
    shared projection; earlier keys stay frozen. Every query goes to some expert once one exists."""

    temperature = 0.1  # cosine similarities in [-1, 1] -> logits in [-10, 10]

    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.query = torch.nn.Linear(hidden, dim, bias=False)
        self.keys = torch.nn.ParameterList()

    def add_key(self, key: torch.Tensor) -> None:
        self.keys.append(torch.nn.Parameter(key.detach().clone(), requires_grad=False))

    def queries(self, keys: torch.Tensor) -> torch.Tensor:
        weight = self.query.weight
        return torch.nn.functional.normalize(self.query(keys.to(weight.device, weight.dtype)), dim=-1)

    def logits(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, experts) routing logits of prompt keys (B, H)."""
        expert_keys = torch.nn.functional.normalize(torch.stack(list(self.keys)), dim=-1)
        return self.queries(keys) @ expert_keys.T / self.temperature
