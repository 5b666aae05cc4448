"""Checkout time and storage of a 100-commit store on the embedded model.

    python benchmarks/store_checkout.py --commits 100 --batch-size 10

Builds a store with one commit per batch of ZsRE training facts (experts trained with few steps: only
their size matters here), then compares a cold `Repo.open(...).model_at(rev)` — base model load, reading
and hash-verifying every expert and anchor object of the version, attaching the adaptor — with a bare
`load_model()`. Target: checkout <= 2x bare load; storage <= 64 KB per edited fact.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lemoe_store.models import load_model
from lemoe_store.repo import Repo
from lemoe_store.schemas.facts import load_facts


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/zsre_mend_train-1k.json")
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="lemoe-checkout-"))
    facts = load_facts(args.data, skipped=[])[: args.commits * args.batch_size]
    repo = Repo.init(root, batch_size=args.batch_size, plan="original", max_steps=args.max_steps,
                     anchor_rephrases=False, locality_regulariser=False)
    began = time.perf_counter()
    created = repo.commit(facts, message="checkout benchmark")
    print(f"built {len(created)} commits of {args.batch_size} facts in {time.perf_counter() - began:.0f} s at {root}")

    bare = [timed(lambda: load_model()) for _ in range(3)]
    print(f"bare load_model(): median {statistics.median(bare):.2f} s")
    print("| version | experts | checkout s | checkout / bare load |")
    print("|---|---|---|---|")
    for rev in ("HEAD", f"HEAD~{len(created) // 2}", f"HEAD~{len(created) - 1}"):
        times = [timed(lambda: Repo.open(root).model_at(rev)) for _ in range(3)]
        experts = len(repo.store.read_commit(repo.store.resolve(rev)).tree)
        ratio = statistics.median(times) / statistics.median(bare)
        print(f"| {rev} | {experts} | {statistics.median(times):.2f} | {ratio:.2f} |")

    objects = repo.store.root / "objects"
    total = sum(p.stat().st_size for p in objects.rglob("*") if p.is_file())
    expert_bytes = sum(repo.store.objects.size(e.expert) + repo.store.objects.size(e.anchors)
                       for e in repo.store.read_commit(created[-1]).tree)
    print(f"storage: {total / len(facts) / 1024:.1f} KB per edited fact in objects/ "
          f"(expert + anchors {expert_bytes / len(facts) / 1024:.1f} KB; facts and manifests the rest)")


if __name__ == "__main__":
    main()
