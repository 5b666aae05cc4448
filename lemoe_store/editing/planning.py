"""Order planning: which facts share a batch (= one expert), and in which order batches are edited.

`cluster` (the LEMoE paper's clustering-based order planning): facts are embedded with the model's own
routing key, k-means-clustered (FAISS, spherical) into clusters of exactly the batch size (one may be
smaller), and the clusters are chained nearest-centroid-first, so each expert learns a coherent group
and neighbouring experts are alike. `subject`: the given order, but facts sharing a subject travel in one
batch — the confusions that matter for routing stay inside one expert, while the rest of a batch stays
diverse, which an expert tells apart more easily than ten look-alikes. `original`, `random` (seeded)
and `reverse` are the baselines.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from ..errors import ConfigError
from .config import PLANS


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def plan(
    keys: torch.Tensor,
    batch_size: int,
    order: str = "cluster",
    seed: int = 0,
    groups: list[str | None] | None = None,
) -> list[list[int]]:
    """Batches of fact indices: a permutation of range(len(keys)), every batch of `batch_size` but one
    (`subject`: at most `batch_size`, as a subject's facts are not split).

    `groups` (cluster and subject orders): a label per fact, e.g. its subject; facts sharing a label are
    kept in one batch where the sizes allow. Facts about one subject are what a rephrase most often confuses
    (their keys are close), and confusing two facts of the same expert costs nothing.
    """
    if order not in PLANS:
        raise ConfigError(f"order must be one of {PLANS}, not {order!r}")
    if batch_size < 1:
        raise ConfigError("batch_size must be positive")
    count = len(keys)
    if order == "original":
        return _chunks(list(range(count)), batch_size)
    if order == "reverse":
        return _chunks(list(reversed(range(count))), batch_size)
    if order == "random":
        rng = np.random.default_rng(seed)
        return _chunks(rng.permutation(count).tolist(), batch_size)
    if order == "subject":
        return _first_fit(_units(groups or [None] * count, batch_size), batch_size)
    clusters = math.ceil(count / batch_size)
    if clusters <= 1:
        return [list(range(count))]
    units = _units(groups or [None] * count, batch_size)
    return _cluster_plan(keys.detach().cpu().float().numpy(), batch_size, clusters, seed, units)


def _units(groups: list[str | None], batch_size: int) -> list[list[int]]:
    """Facts that should travel together: each labelled group (in chunks of batch_size), else alone."""
    by_label: dict[str, list[int]] = {}
    units: list[list[int]] = []
    for index, label in enumerate(groups):
        if label:
            by_label.setdefault(label, []).append(index)
        else:
            units.append([index])
    for members in by_label.values():
        units.extend(_chunks(members, batch_size))
    return sorted(units)


def _first_fit(units: list[list[int]], batch_size: int) -> list[list[int]]:
    """Units in order of their first fact, each into the first batch with room for all of it."""
    batches: list[list[int]] = []
    for unit in units:
        batch = next((b for b in batches if len(b) + len(unit) <= batch_size), None)
        if batch is None:
            batches.append(batch := [])
        batch.extend(unit)
    return batches


def _cluster_plan(
    points: np.ndarray, batch_size: int, clusters: int, seed: int, units: list[list[int]]
) -> list[list[int]]:
    points = np.ascontiguousarray(points / np.linalg.norm(points, axis=1, keepdims=True).clip(1e-12))
    kmeans = faiss.Kmeans(
        points.shape[1], clusters, niter=25, nredo=8, seed=seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(points)
    centroids = kmeans.centroids
    similarity = points @ centroids.T  # (N, k)

    # Balanced assignment: every cluster takes exactly batch_size facts, except the one that is naturally
    # smallest, which takes the remainder. Larger units go first (they are the hardest to fit), each to
    # its best cluster with room; among units of one size, the most confident claim first.
    capacity = np.full(clusters, batch_size)
    natural = np.bincount(similarity.argmax(axis=1), minlength=clusters)
    capacity[int(np.argmin(natural))] -= clusters * batch_size - len(points)
    assignment = np.full(len(points), -1)
    unit_similarity = np.stack([similarity[unit].mean(axis=0) for unit in units])
    sizes = np.array([len(unit) for unit in units])
    pairs = np.lexsort((-unit_similarity.ravel(), -np.repeat(sizes, clusters)))
    for flat in pairs:
        unit, cluster = divmod(int(flat), clusters)
        members = units[unit]
        if assignment[members[0]] == -1 and capacity[cluster] >= len(members):
            assignment[members] = cluster
            capacity[cluster] -= len(members)
    # Units that no longer fit whole anywhere are split: their facts take the best places left.
    leftovers = [i for unit in units for i in unit if assignment[i] == -1]
    for flat in np.argsort(-similarity[leftovers], axis=None, kind="stable"):
        row, cluster = divmod(int(flat), clusters)
        point = leftovers[row]
        if assignment[point] == -1 and capacity[cluster] > 0:
            assignment[point] = cluster
            capacity[cluster] -= 1

    # Chain the clusters: start where the first fact lives, then always step to the nearest unvisited one.
    order = [int(assignment[0])]
    remaining = set(range(clusters)) - set(order)
    while remaining:
        last = centroids[order[-1]]
        order.append(max(sorted(remaining), key=lambda c: float(centroids[c] @ last)))
        remaining.remove(order[-1])
    return [np.flatnonzero(assignment == c).tolist() for c in order]
