"""MEMOIR's overlap threshold τ on this model, chosen on a tuning split: edit the first T facts once, then
score each τ (it acts at inference only: which prompts read the memory).

    python benchmarks/memoir_threshold.py --data ../shared/data/zsre_mend_train-1k.json --T 100
    python benchmarks/memoir_threshold.py --data ../shared/data/counterfact-edit-1k.json --T 100 --background 250:500

Edits carry only `prompt`, `target` and `subject`. The background (MEMOIR's never-edited prompts, which
centre the masks) is the locality prompts of the records `--background` of the same file, never edited.
τ = 0.4 is the reference's value for LLaMA-3-8B's 14,336-wide FFN; SmolLM2's is 1,536 wide. Prints, per τ,
teacher-forced Rel / Gen / Loc and the share of rephrases and of locality prompts that read the memory,
and the mask overlap of each kind of prompt with its nearest edit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lemoe_store.bench import BenchSettings, irrelevant_pool
from lemoe_store.bench.memoir import OVERLAP_THRESHOLD, Memoir
from lemoe_store.bench.runner import code_version
from lemoe_store.editing import evaluate
from lemoe_store.editing.batching import encode_prompt
from lemoe_store.editing.metrics import locality_predictions
from lemoe_store.models import load_model
from lemoe_store.schemas.facts import Fact

sys.path.insert(0, str(Path(__file__).resolve().parent))
from never_edited import records_and_never_edited  # noqa: E402


def overlaps(method: Memoir, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Each prompt's largest mask overlap with a stored edit (what τ is compared with)."""
    found = []
    for start in range(0, len(prompts), 16):
        method._prompt_masks([encode_prompt(tokenizer, p) for p in prompts[start : start + 16]])
        found.append(method.memory.last_overlaps.cpu())
    return torch.cat(found) if found else torch.zeros(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/zsre_mend_train-1k.json")
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--background", default="500:1000", help="START:END records whose locality prompts centre the masks")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memoir_threshold.json"))
    args = parser.parse_args()

    records, background = records_and_never_edited(parser, args.data, args.background, args.T, "--background")
    model, tokenizer = load_model(args.model)
    facts = records[: args.T]
    edits = [Fact(prompt=f.prompt, target=f.target, id=f.id, subject=f.subject) for f in facts]
    base_locality = locality_predictions(model, tokenizer, facts)
    torch.manual_seed(0)
    method = Memoir(model, tokenizer, BenchSettings(), irrelevant_pool(tokenizer, background))
    began = time.perf_counter()
    for start in range(0, len(edits), 10):
        method.edit(edits[start : start + 10])
    seconds = (time.perf_counter() - began) / len(edits)

    kinds = {"edit prompts": [f.prompt for f in facts], "rephrases": [r for f in facts for r in f.rephrases],
             "locality prompts": [loc.prompt for f in facts for loc in f.locality]}
    overlap = {kind: overlaps(method, tokenizer, prompts) for kind, prompts in kinds.items()}
    print(f"{args.data} first {args.T}, background records {args.background}: {seconds:.2f} s per edit; "
          f"mask k = {method.memory.k} of {method.memory.residual.shape[1]}")
    print("| prompts | mean overlap | min | max |\n|---|---|---|---|")
    for kind, values in overlap.items():
        print(f"| {kind} | {values.mean():.3f} | {values.min():.3f} | {values.max():.3f} |")
    print("\n| τ | Rel | Gen | Loc | mean | rephrases read the memory | locality prompts read it |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for tau in args.tau:
        method.memory.threshold = tau
        scores = evaluate(method.model_for_eval(), tokenizer, facts, base_locality=base_locality)
        row = {"tau": tau, "rel": scores.rel, "gen": scores.gen, "loc": scores.loc, "mean": scores.mean,
               "rephrases_read": float((overlap["rephrases"] >= tau).float().mean()),
               "locality_read": float((overlap["locality prompts"] >= tau).float().mean())}
        rows.append(row)
        print(f"| {tau:.2f}{' (default)' if tau == OVERLAP_THRESHOLD else ''} | {row['rel']:.3f} | {row['gen']:.3f} | "
              f"{row['loc']:.3f} | {row['mean']:.3f} | {row['rephrases_read']:.2f} | {row['locality_read']:.2f} |",
              flush=True)
    method.close()
    best = max(rows, key=lambda r: r["mean"])
    print(f"\nbest mean of Rel / Gen / Loc on this split: τ = {best['tau']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"commit": code_version(), "data": args.data, "T": args.T,
                                    "background": args.background, "s_per_edit": round(seconds, 3),
                                    "overlap": {k: [round(float(v), 4) for v in vals] for k, vals in overlap.items()},
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
