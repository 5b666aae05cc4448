"""KV anchor routing: query keys are matched against the anchor keys of every expert with FAISS.

A key is the mean, over the prompt tokens (the first token left out: Llama-family models park huge
activations there, which makes every prompt look alike), of the MLP input at the adaptor layer, L2-normalised.
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
