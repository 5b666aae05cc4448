"""Flat against IVF anchor search on synthetic routing keys (issue 19): query time, build time, recall@1.

    python benchmarks/anchor_index.py [--sizes 10000,100000,1000000] [--queries 500]

Synthetic keys (labelled as such: no model runs) copy the shape of the embedded model's real keys, measured
on 400 ZsRE training prompts: every key leans on one shared direction (the mean key has norm 0.81), so
unrelated anchors sit at cosine ~0.66; anchors of one cluster (a relation and topic) sit closer (~0.83);
a rephrase sits at ~0.92 from its own anchor. Queries are rephrase-like perturbations of random anchors
(those are the ones routing must get right) and, separately, fresh keys from the same distribution
(prompts about nothing edited). recall@1 = the IVF's top anchor is the flat index's top anchor.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from lemoe_store.editing.routing import APPROXIMATE_FROM, KeyIndex

DIM = 576  # SmolLM2-135M's hidden size
SHARED = 0.81  # projection of a key on the shared direction
CLUSTER_SIZE = 100
REPHRASE_NOISE = 0.42  # relative noise that puts a rephrase at cosine ~0.92 from its anchor


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class SyntheticKeys:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.shared = unit(self.rng.standard_normal(DIM)).astype(np.float32)

    def _orthogonal(self, x: np.ndarray) -> np.ndarray:
        return unit(x - (x @ self.shared)[:, None] * self.shared)

    def keys(self, n: int) -> np.ndarray:
        out = np.empty((n, DIM), dtype=np.float32)
        for start in range(0, n, 100_000):
            rows = min(100_000, n - start)
            centres = self.rng.standard_normal((rows // CLUSTER_SIZE + 1, DIM)).astype(np.float32)
            own = np.repeat(centres, CLUSTER_SIZE, axis=0)[:rows] + self.rng.standard_normal((rows, DIM)).astype(np.float32)
            out[start : start + rows] = SHARED * self.shared + np.sqrt(1 - SHARED**2) * self._orthogonal(own)
        return unit(out)

    def rephrases(self, anchors: np.ndarray) -> np.ndarray:
        noise = self.rng.standard_normal(anchors.shape).astype(np.float32)
        noise = self._orthogonal(noise) * REPHRASE_NOISE
        return unit(anchors + noise).astype(np.float32)


def per_query_ms(index: faiss.Index, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean ms per query, one query at a time (a served prompt routes alone), and the top rows."""
    rows = np.empty(len(queries), dtype=np.int64)
    started = time.perf_counter()
    for i, query in enumerate(queries):
        rows[i] = index.search(query[None, :], 1)[1][0, 0]
    return (time.perf_counter() - started) * 1000 / len(queries), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    print(f"faiss threads {faiss.omp_get_max_threads()}; switch to IVF at {APPROXIMATE_FROM:,} anchors (routing.py)")
    print("| anchors | flat ms/query | IVF lists | IVF build s | lists probed | IVF ms/query | recall@1 rephrases | "
          "recall@1 unrelated | serialised MB | load s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        synthetic = SyntheticKeys(seed=size)
        anchors = synthetic.keys(size)
        targets = synthetic.rng.choice(size, args.queries, replace=False)
        rephrases = synthetic.rephrases(anchors[targets])
        unrelated = synthetic.keys(args.queries)
        keys = KeyIndex(DIM)
        keys.add(anchors)
        del anchors
        flat_ms, flat_rephrase = per_query_ms(keys.flat, rephrases)
        _, flat_unrelated = per_query_ms(keys.flat, unrelated)
        started = time.perf_counter()
        keys.build_ivf()
        build_s = time.perf_counter() - started
        data = keys.ivf_bytes()
        started = time.perf_counter()
        assert keys.load_ivf(data)
        load_s = time.perf_counter() - started
        default_probes = keys.ivf.nprobe
        for probes in sorted({max(1, keys.ivf.nlist // 64), max(1, keys.ivf.nlist // 32), default_probes}):
            keys.ivf.nprobe = probes
            ivf_ms, ivf_rephrase = per_query_ms(keys.ivf, rephrases)
            _, ivf_unrelated = per_query_ms(keys.ivf, unrelated)
            mark = " (default)" if probes == default_probes else ""
            print(f"| {size:,} | {flat_ms:.2f} | {keys.ivf.nlist} | {build_s:.1f} | {probes}{mark} | {ivf_ms:.2f} | "
                  f"{np.mean(ivf_rephrase == flat_rephrase):.4f} | {np.mean(ivf_unrelated == flat_unrelated):.4f} | "
                  f"{len(data) / 1e6:.0f} | {load_s:.2f} |", flush=True)
        own_cos = float(np.mean(np.sum(rephrases * keys.reconstruct_batch(targets), axis=1)))
        print(f"(rephrase-like queries sit at cosine {own_cos:.3f} from their anchors)", flush=True)

if __name__ == "__main__":
    main()
