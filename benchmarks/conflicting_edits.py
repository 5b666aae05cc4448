"""WILD Gen broken down by whether a fact's subject is edited again, with another target, in the same run.

    python benchmarks/lifelong.py --data ../shared/data/zsre_mend_eval.json --T 1000 --protocol both \
        --samples /tmp/zsre.samples.json
    python benchmarks/conflicting_edits.py --data ../shared/data/zsre_mend_eval.json --samples /tmp/zsre.samples.json

Two edits of one subject with different targets ("Which constellation is NGC 6604 in?" → Andromeda, then
"What constellation does NGC 6604 belong to?" → Pegasus) leave a rephrase of either one with two right
answers by the store's lights but one by the metric's; this script says how much of WILD Gen that costs.
Reads the samples file only (no model); counts each rephrase as a hit, the other edit's target, or a miss.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from lemoe_store.editing.wild import starts_with_target
from lemoe_store.schemas.facts import load_facts

KINDS = ("subject edited once", "subject edited again, same target", "subject edited again, another target")
OTHER = "the other edit's target"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True, help="written by lifelong.py --samples")
    parser.add_argument("--T", type=int, default=None, help="which run of the samples file (default: the largest)")
    args = parser.parse_args()

    runs = json.loads(args.samples.read_text())
    size = args.T or max(int(t) for t in runs)
    facts = load_facts(args.data, skipped=[])[:size]
    rephrases = [s for s in runs[str(size)] if s["kind"] == "rephrase"]
    targets = defaultdict(set)
    for fact in facts:
        targets[fact.subject].add(fact.target)
    edits_of = Counter(f.subject for f in facts)
    rephrased = [f for f in facts for _ in f.rephrases]  # the order evaluate() generates them in
    outcomes: Counter[tuple[str, str]] = Counter()
    for fact, sample in zip(rephrased, rephrases, strict=True):
        others = targets[fact.subject] - {fact.target}
        kind = KINDS[0] if edits_of[fact.subject] == 1 else KINDS[2] if others else KINDS[1]
        if starts_with_target(sample["answer"], fact.target):
            outcome = "hit"
        elif any(starts_with_target(sample["answer"], other) for other in others):
            outcome = OTHER
        else:
            outcome = "miss"
        outcomes[kind, outcome] += 1

    print(f"{args.data} T = {size}: {len(rephrases)} rephrases")
    print(f"| facts | rephrases | WILD Gen | {OTHER} |")
    print("|---|---|---|---|")
    for kind in (*KINDS, "all"):
        counts: Counter[str] = Counter()
        for (k, outcome), n in outcomes.items():
            if kind in (k, "all"):
                counts[outcome] += n
        total = sum(counts.values())
        if total:
            print(f"| {kind} | {total} | {counts['hit'] / total:.3f} | {counts[OTHER] / total:.3f} |")


if __name__ == "__main__":
    main()
