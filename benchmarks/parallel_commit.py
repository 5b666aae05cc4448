"""Commit throughput with the batches trained in turn, on 2 local workers, and on a local Ray cluster.

    python benchmarks/parallel_commit.py [--data ../shared/data/zsre_mend_train-1k.json] [--facts 200]

Each run commits the same facts (prompt, target, subject only; the ZsRE training split by default) into a
fresh store on the embedded model, batch 10, and reports seconds per fact for the whole `commit` (planning,
training, scoring each batch, writing). Then it checks that the parallel histories equal the sequential
one: the same facts per commit, the same anchors, expert weights within float tolerance.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lemoe_store import Fact, Repo, load_facts
from lemoe_store.bench import code_version


def timed_commit(directory: Path, facts: list[Fact], **parallel) -> tuple[Repo, float]:
    repo = Repo.init(directory)
    began = time.perf_counter()
    repo.commit(facts, message="parallel benchmark", **parallel)
    return repo, time.perf_counter() - began


def max_weight_difference(repo: Repo, reference: Repo) -> float:
    ours, theirs = repo.experts_at(repo.resolve("HEAD")), reference.experts_at(reference.resolve("HEAD"))
    assert [a.anchor_facts for a in ours] == [b.anchor_facts for b in theirs], "different facts per commit"
    assert all(torch.allclose(a.anchors, b.anchors, atol=1e-5) for a, b in zip(ours, theirs)), "other anchors"
    return max((a.weights[k] - b.weights[k]).abs().max().item() for a, b in zip(ours, theirs) for k in a.weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/zsre_mend_train-1k.json"))
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel_commit.json"))
    args = parser.parse_args()
    facts = [Fact(prompt=f.prompt, target=f.target, id=f.id, subject=f.subject)
             for f in load_facts(args.data, skipped=[])[: args.facts]]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        sequential, seconds = timed_commit(root / "in-turn", facts)
        rows["in turn (1 process, 2 threads)"] = {"s_per_fact": seconds / len(facts)}
        for name, parallel in (("2 local workers", {"workers": 2}), ("Ray, local cluster of 2 CPUs", {"ray": "local", "workers": 2})):
            repo, seconds = timed_commit(root / name.split()[0], facts, **parallel)
            rows[name] = {"s_per_fact": seconds / len(facts), "max_weight_difference": max_weight_difference(repo, sequential)}
    base = rows["in turn (1 process, 2 threads)"]["s_per_fact"]
    for row in rows.values():
        row["speed_up"] = round(base / row["s_per_fact"], 3)
        row["s_per_fact"] = round(row["s_per_fact"], 4)
    result = {"commit": code_version(), "data": str(args.data), "facts": len(facts), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
