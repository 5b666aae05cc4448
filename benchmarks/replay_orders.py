"""Order sensitivity through the store: commit facts in their original order, then `replay` them
under each ordering on its own branch and compare.

    python benchmarks/replay_orders.py --data ../shared/data/zsre_mend_eval.json --n 200

Equivalent CLI: `lemoe commit eval200.jsonl --plan original`, then
`lemoe replay --order cluster -b replay-cluster` (and original, random, reverse).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lemoe_store.editing import PLANS
from lemoe_store.repo import Repo
from lemoe_store.schemas.facts import load_facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/zsre_mend_eval.json")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lemoe-replay-"))
    facts = load_facts(args.data, skipped=[])[: args.n]
    # Rephrases and locality prompts are held-out evaluation data here: never trained on, never anchors.
    repo = Repo.init(root, batch_size=args.batch_size, plan="original", anchor_rephrases=False,
                     locality_regulariser=False)
    repo.commit(facts, message=f"first {args.n} facts, original order")
    print(f"store {root}: {args.n} facts committed in original order")
    print("| ordering | #batches | Rel | Gen | Loc | mean | train s |")
    print("|---|---|---|---|---|---|---|")
    for order in PLANS:
        _, rows = repo.replay(f"replay-{order}", plan=order, seed=args.seed, batch_size=args.batch_size)
        row = rows[1]
        mean = (row.rel + row.gen + row.loc) / 3
        print(f"| {order} | {row.batches} | {row.rel:.3f} | {row.gen:.3f} | {row.loc:.3f} | {mean:.3f} | "
              f"{row.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
