"""The approximate (IVF) anchor index: the same routes as flat search, built once per version and cached."""

from __future__ import annotations

import numpy as np
import torch

from conftest import tiny_facts
from lemoe_store.editing import routing
from lemoe_store.editing.routing import NO_EXPERT, AnchorIndex
from lemoe_store.repo import Repo

DIM = 32


def _clustered_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    centres = rng.standard_normal((n // 20 + 1, DIM))
    keys = np.repeat(centres, 20, axis=0)[:n] + 0.6 * rng.standard_normal((n, DIM))
    return (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)


def _synthetic_index(rng: np.random.Generator, n: int) -> tuple[AnchorIndex, np.ndarray, list[list[list[int]]]]:
    """n anchors over 30 experts; every third anchor has a subject (token [1000 + row]), the rest none."""
    keys = _clustered_keys(rng, n)
    subjects = [[[1000 + row]] if row % 3 == 0 else [] for row in range(n)]
    index = AnchorIndex(DIM, threshold=0.8, subject_threshold=0.6)
    for expert, rows in enumerate(np.array_split(np.arange(n), 30)):
        index.add(keys[rows], expert, [2] * len(rows), [subjects[r] for r in rows])
    return index, keys, subjects


class DictCache:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.writes = 0

    def get_cached(self, name: str) -> bytes | None:
        return self.files.get(name)

    def put_cached(self, name: str, data: bytes) -> None:
        self.files[name] = data
        self.writes += 1


def test_ivf_search_routes_like_flat_search_on_a_synthetic_set():
    rng = np.random.default_rng(0)
    flat, keys, subjects = _synthetic_index(rng, 3000)
    approximate, _, _ = _synthetic_index(np.random.default_rng(0), 3000)
    approximate.index_approximately(minimum=1000)
    assert approximate.index.ivf is not None and approximate.open_index.ivf is not None
    assert flat.index.ivf is None

    targets = rng.choice(len(keys), 200, replace=False)
    near = keys[targets] + 0.07 * rng.standard_normal((200, DIM)).astype(np.float32)  # rephrase-like
    far = _clustered_keys(rng, 200)  # about nothing edited
    queries = torch.from_numpy(np.concatenate([near, far]))
    queries = torch.nn.functional.normalize(queries, dim=-1)
    prompts = [[5, *subjects[t][0]] if subjects[t] else [5] for t in targets] + [[5]] * 200

    exact, approx = flat.route(queries, prompts), approximate.route(queries, prompts)
    routed = [r for r in exact if r.expert != NO_EXPERT]
    assert len(routed) > 150  # the comparison is about real routes, not "none" everywhere
    assert [r.expert for r in approx] == [r.expert for r in exact]
    assert [r.anchor for r in approx if r.expert != NO_EXPERT] == [r.anchor for r in routed]


def test_the_ivf_index_is_built_once_and_read_back_from_the_cache():
    rng = np.random.default_rng(1)
    cache = DictCache()
    first, keys, _ = _synthetic_index(rng, 2000)
    first.index_approximately(cache, "c1", minimum=1000)
    assert cache.writes == 2 and set(cache.files) == {"anchors-c1-all.ivf", "anchors-c1-open.ivf"}

    second, _, _ = _synthetic_index(np.random.default_rng(1), 2000)
    second.index_approximately(cache, "c1", minimum=1000)
    assert cache.writes == 2  # read, not rebuilt
    query = torch.from_numpy(keys[:50])
    assert np.array_equal(first.search(query, 3)[1], second.search(query, 3)[1])

    cache.files["anchors-c2-all.ivf"] = b"not an index"  # damaged or foreign: rebuilt, never trusted
    third, _, _ = _synthetic_index(np.random.default_rng(1), 2000)
    third.index_approximately(cache, "c2", minimum=1000)
    assert cache.writes == 4 and len(cache.files["anchors-c2-all.ivf"]) > 1000


def test_new_anchors_join_a_built_ivf_index_under_their_own_rows():
    rng = np.random.default_rng(2)
    index, _, _ = _synthetic_index(rng, 1500)
    index.index_approximately(minimum=1000)
    extra = _clustered_keys(rng, 10)
    index.add(extra, 30, [1] * 10, [[]] * 10)
    sims, rows = index.search(torch.from_numpy(extra), 1)
    assert rows[:, 0].tolist() == list(range(1500, 1510)) and np.allclose(sims[:, 0], 1.0, atol=1e-5)


def test_a_store_version_over_the_switch_caches_its_index_and_answers_alike(tmp_path, tiny_llama_dir, monkeypatch):
    repo = Repo.init(tmp_path / "work", model=str(tiny_llama_dir), layer=2, rank=16, lr=2e-2, max_steps=60,
                     batch_size=6, plan="original")
    facts = tiny_facts()
    cid = repo.commit(facts, message="twelve facts")[-1]
    exact = [repo.ask(f.prompt, max_new_tokens=3) for f in facts]

    monkeypatch.setattr(routing, "APPROXIMATE_FROM", 5)
    again = Repo.open(tmp_path / "work")
    approximate = [again.ask(f.prompt, max_new_tokens=3) for f in facts]
    cached = sorted(p.name for p in (tmp_path / "work" / ".lemoe" / "cache").iterdir())
    assert cached == [f"anchors-{cid}-all.ivf"]  # every tiny fact has a subject: no open anchors
    assert [(a.text, a.expert, a.fact_id) for a in approximate] == [(a.text, a.expert, a.fact_id) for a in exact]
