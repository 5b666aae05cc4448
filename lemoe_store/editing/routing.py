"""KV anchor routing: query keys are matched against the anchor keys of every expert with FAISS.

(`PaperRouter`, at the end, is the LEMoE paper's own variant, kept for the ablation: one learned key per
expert, a learned query projection, top-1 softmax and no "none" choice.)

A key is the mean, over the prompt tokens (the first token left out: Llama-family models park huge
activations there, which makes every prompt look alike), of the MLP input at the key layer (an early one, see
`EditConfig.key_layer`), L2-normalised.
The nearest anchor by cosine similarity decides the expert; below the threshold no expert is applied.

Subject check: an anchor whose fact names a subject can only be matched by a query in which that subject
occurs (as tokens). Prompt keys are dominated by a relation's wording, so without the check a prompt about
another subject in the same template ("Sarah Bernhardt speaks the language" beside an edit of "Christa
Theret speaks the language") lands next to the edited fact. An anchor whose subject occurs is matched at
its own, lower threshold (`subject_threshold`): the subject is the stronger evidence, and rephrases that
bury it in other words still reach their fact. Anchors without a subject are matched by similarity alone.

Search is exact (a flat scan) while the anchors are few. Past `APPROXIMATE_FROM` anchors a flat scan starts
to cost a noticeable share of the model's own forward, so searches go through an IVF index built over the
same keys (`KeyIndex`); a version's IVF index is built once and cached by whoever attaches it (`IndexCache`).
Routing itself stays exact where it matters: IVF recall@1 for queries near an anchor is 1.000 against flat
at 1,000,000 synthetic anchors; only the "nearest anchor" reported for unrouted queries is approximate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
    """The routing decision for one query: expert index (or NO_EXPERT), best similarity, anchor row, and
    the threshold that applied to it (None: the anchor's subject is not in the query, so it could not
    match at any similarity)."""

    expert: int
    similarity: float
    anchor: int
    threshold: float | None = None


UNBOUNDED_SPAN = 1 << 30  # anchors stored before spans were recorded: the expert acts on every later token


def occurs_at(tokens: Sequence[int], position: int, sequence: Sequence[int]) -> bool:
    """Whether `sequence` appears in `tokens` starting at `position`."""
    return tuple(tokens[position : position + len(sequence)]) == tuple(sequence)


def occurs(sequence: Sequence[int], tokens: Sequence[int]) -> bool:
    """Whether `sequence` appears contiguously in `tokens`."""
    return any(occurs_at(tokens, i, sequence) for i in range(len(tokens) - len(sequence) + 1))


class SubjectLookup:
    """Which anchors' subjects occur in a token sequence: anchors listed by their subject's first token."""

    def __init__(self) -> None:
        self.by_first_token: dict[int, list[tuple[int, tuple[int, ...]]]] = {}

    def add(self, anchor: int, sequences: Sequence[Sequence[int]]) -> None:
        for sequence in sequences:
            self.by_first_token.setdefault(int(sequence[0]), []).append((anchor, tuple(sequence)))

    def occurring(self, tokens: Sequence[int]) -> list[int]:
        found: set[int] = set()
        for position, token in enumerate(tokens):
            for anchor, sequence in self.by_first_token.get(int(token), ()):
                if occurs_at(tokens, position, sequence):
                    found.add(anchor)
        return sorted(found)


# `benchmarks/anchor_index.py`, 576-d keys, 2 CPU cores: a flat scan costs ~0.18 ms per 1,000 anchors, so
# 20,000 anchors take ~3.6 ms, ~4 % of the embedded model's forward of a short prompt (~95 ms); beyond that
# the IVF index (under 1 ms to search, well under a second to build at this size) pays for itself.
APPROXIMATE_FROM = 20_000
IVF_LISTS_PER_SQRT = 4  # nlist = 4 sqrt(n), FAISS's rule of thumb
IVF_PROBE_SHARE = 1 / 16  # lists visited per query: recall@1 >= 0.99 against flat at 1M synthetic anchors
IVF_MIN_PROBES = 16  # and never fewer: small indexes have few, coarse lists
IVF_TRAINING_POINTS_PER_LIST = 64
IVF_SEED = 1234


class IndexCache(Protocol):
    """Where a version's approximate index is kept between loads (the store's cache/)."""

    def get_cached(self, name: str) -> bytes | None: ...

    def put_cached(self, name: str, data: bytes) -> None: ...


def build_ivf(keys: np.ndarray) -> faiss.IndexIVFFlat:
    """An inner-product IVF index over unit `keys` (n, d), trained on a seeded sample of them."""
    n, dim = keys.shape
    lists = max(1, min(int(IVF_LISTS_PER_SQRT * math.sqrt(n)), n // IVF_TRAINING_POINTS_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = min(n, lists * IVF_TRAINING_POINTS_PER_LIST)
    rows = np.random.default_rng(IVF_SEED).choice(n, size=sample, replace=False) if sample < n else np.arange(n)
    index.cp.seed = IVF_SEED
    index.train(np.ascontiguousarray(keys[np.sort(rows)]))
    index.add(keys)
    _set_probes(index)
    return index


def _set_probes(index: faiss.IndexIVFFlat) -> None:
    index.nprobe = min(index.nlist, max(IVF_MIN_PROBES, math.ceil(index.nlist * IVF_PROBE_SHARE)))


class KeyIndex:
    """Unit keys searched by inner product: a flat index holds them (exact search, reconstruction), and an
    IVF index over the same rows answers searches once one is built."""

    def __init__(self, dim: int) -> None:
        self.flat = faiss.IndexFlatIP(dim)
        self.ivf: faiss.IndexIVFFlat | None = None

    @property
    def ntotal(self) -> int:
        return self.flat.ntotal

    def add(self, keys: np.ndarray) -> None:
        self.flat.add(keys)
        if self.ivf is not None:
            self.ivf.add(keys)  # rows keep their numbers: both indexes number them in insertion order

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.ivf or self.flat).search(query, k)

    def reconstruct_batch(self, rows: np.ndarray) -> np.ndarray:
        return self.flat.reconstruct_batch(rows)

    def build_ivf(self) -> None:
        self.ivf = build_ivf(self.flat.reconstruct_n(0, self.ntotal))

    def ivf_bytes(self) -> bytes:
        return faiss.serialize_index(self.ivf).tobytes()

    def load_ivf(self, data: bytes) -> bool:
        """Use a serialised IVF index; False (and none used) if it is unreadable or holds other rows."""
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError:
            return False
        if not isinstance(index, faiss.IndexIVFFlat) or index.ntotal != self.ntotal or index.d != self.flat.d:
            return False
        _set_probes(index)
        self.ivf = index
        return True


class AnchorIndex:
    """Anchor keys of all active experts in a FAISS inner-product index (keys are unit vectors).

    Per anchor it also keeps the expert it belongs to, its span (how many answer tokens its expert was
    trained on, from the last prompt token on: the expert acts there and nowhere after) and its subject's
    token sequences (none: matched by similarity alone).
    """

    def __init__(self, dim: int, threshold: float, subject_threshold: float) -> None:
        self.dim = dim
        self.threshold = threshold
        self.subject_threshold = subject_threshold
        self.index = KeyIndex(dim)  # every anchor (blame searches it)
        self.open_index = KeyIndex(dim)  # anchors without a subject: matched by similarity alone
        self.open_rows = np.zeros(0, dtype=np.int64)  # open_index row -> anchor row
        self.experts = np.zeros(0, dtype=np.int64)  # anchor row -> expert index
        self.spans = np.zeros(0, dtype=np.int64)  # anchor row -> answer tokens its expert acts on
        self.subjects = SubjectLookup()

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, keys: torch.Tensor | np.ndarray, expert: int, spans: Sequence[int] | None = None,
            subjects: Sequence[Sequence[Sequence[int]]] | None = None) -> None:
        """Add anchors of `expert`; `spans`/`subjects` per anchor (None: unbounded, no subject)."""
        array = keys.detach().cpu().float().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys, np.float32)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"anchor keys must have shape (n, {self.dim}), got {array.shape}")
        spans = list(spans) if spans is not None else [UNBOUNDED_SPAN] * len(array)
        subjects = list(subjects) if subjects is not None else [()] * len(array)
        if len(spans) != len(array) or len(subjects) != len(array):
            raise ValueError(f"{len(array)} anchor keys but {len(spans)} spans and {len(subjects)} subjects")
        first = len(self)
        self.index.add(array)
        self.experts = np.concatenate([self.experts, np.full(len(array), expert, dtype=np.int64)])
        self.spans = np.concatenate([self.spans, np.asarray(spans, dtype=np.int64)])
        open_rows = [first + i for i, sequences in enumerate(subjects) if not sequences]
        if open_rows:
            self.open_index.add(array[[row - first for row in open_rows]])
            self.open_rows = np.concatenate([self.open_rows, np.asarray(open_rows, dtype=np.int64)])
        for i, sequences in enumerate(subjects):
            if sequences:
                self.subjects.add(first + i, sequences)

    def index_approximately(self, cache: IndexCache | None = None, version: str | None = None, *,
                            minimum: int | None = None) -> None:
        """Search through IVF indexes from `minimum` anchors on (default `APPROXIMATE_FROM`; below it, exact
        search stays). Each is read from `cache` under `version`'s name when there, else built and put there."""
        minimum = max(APPROXIMATE_FROM if minimum is None else minimum, 1)
        for part, keys in (("all", self.index), ("open", self.open_index)):
            if keys.ntotal < minimum or keys.ivf is not None:
                continue
            name = f"anchors-{version}-{part}.ivf" if version else None
            cached = cache.get_cached(name) if cache is not None and name else None
            if cached is not None and keys.load_ivf(cached):
                continue
            keys.build_ivf()
            if cache is not None and name:
                cache.put_cached(name, keys.ivf_bytes())

    def search(self, keys: torch.Tensor, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, anchor rows) for each key, subjects not checked; rows are -1 where fewer
        anchors exist."""
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

    def spans_of(self, routes: list[Route]) -> torch.Tensor:
        """(B,) the span of each route's anchor (0 for rows routed to no expert)."""
        return torch.tensor([int(self.spans[r.anchor]) if r.expert != NO_EXPERT else 0 for r in routes])

    def route(self, keys: torch.Tensor, prompts: Sequence[Sequence[int]]) -> list[Route]:
        """One route per query key; `prompts[i]` is query i's prompt tokens (for the subject check)."""
        if len(self) == 0:
            return [Route(NO_EXPERT, float("-inf"), -1) for _ in range(keys.shape[0])]
        query = np.ascontiguousarray(keys.detach().cpu().float().numpy())
        open_sims, open_ids = (self.open_index.search(query, min(8, self.open_index.ntotal))
                               if self.open_index.ntotal else (None, None))
        nearest_sims, nearest_rows = self.index.search(query, 1)  # reported where nothing routes
        routes = []
        for row, key in enumerate(query):
            # (similarity, threshold, anchor) of every anchor this query may match
            candidates: list[tuple[float, float, int]] = []
            if open_sims is not None:
                candidates += [(float(s), self.threshold, int(self.open_rows[i]))
                               for s, i in zip(open_sims[row], open_ids[row]) if i >= 0]
            subject_rows = self.subjects.occurring(prompts[row])
            if subject_rows:
                stored = self.index.reconstruct_batch(np.asarray(subject_rows, dtype=np.int64))
                candidates += [(float(s), self.subject_threshold, a) for s, a in zip(stored @ key, subject_rows)]
            nearest = int(nearest_rows[row, 0])  # -1: an IVF search found none in the lists it visited
            nearest_sim = float(nearest_sims[row, 0]) if nearest >= 0 else float("-inf")
            routes.append(self._best(candidates, nearest_sim, nearest))
        return routes

    def _best(self, candidates: list[tuple[float, float, int]], nearest_sim: float, nearest: int) -> Route:
        """The most similar candidate at or above its threshold (ties: the newest expert, as a later
        edit overwrites). None passes: NO_EXPERT with the nearest anchor (for reporting), and its threshold
        if it was a candidate at all."""
        passing = [(s, t, a) for s, t, a in candidates if s >= t]
        if not passing:
            threshold = next((t for _, t, a in candidates if a == nearest), None)
            return Route(NO_EXPERT, nearest_sim, nearest, threshold)
        best = max(s for s, _, _ in passing)
        expert, anchor, threshold = max((self.experts[a], a, t) for s, t, a in passing if s >= best - _TIE)
        return Route(int(expert), best, int(anchor), threshold)


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
