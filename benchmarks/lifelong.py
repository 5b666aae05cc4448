"""Lifelong editing with the LEMoE engine: edit the first T facts batch by batch, then score all T.

    python benchmarks/lifelong.py --data ../shared/data/zsre_mend_eval.json --T 100 1000 --protocol both
    python benchmarks/lifelong.py --data ../shared/data/counterfact-edit-1k.json --records 500:1000 --T 500

Edits carry only `prompt`, `target` and `subject`: rephrases and locality prompts are evaluation data.
Rel/Gen/Loc follow EasyEdit (teacher-forced, see ../shared/data/README.md); `--protocol wild|both` adds the
free-generation metrics (WILD Rel/Gen/Loc, fluency and degenerate continuations against the base model).
Also reports seconds per edited fact (planning + training, amortised), stored bytes per fact
(expert + anchor safetensors), and the routed forward's time against the base model's. `--samples FILE`
writes every generated answer, to read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lemoe_store.editing import EditConfig, Editor, detach, evaluate, find_adaptor, plan
from lemoe_store.bench.runner import code_version
from lemoe_store.editing.batching import encode_prompt
from lemoe_store.models import load_model
from lemoe_store.plumbing import artifact_to_blobs
from lemoe_store.schemas.facts import Fact, load_facts


def forward_seconds(model, tokenizer, prompts: list[str], repeats: int = 3) -> float:
    """Best-of-`repeats` time of one forward per prompt (batch 1, as `ask` runs)."""
    inputs = [torch.tensor([encode_prompt(tokenizer, p)]) for p in prompts]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            began = time.perf_counter()
            for ids in inputs:
                model(input_ids=ids)
            best = min(best, time.perf_counter() - began)
    return best


def edit_only(fact: Fact) -> Fact:
    """What a reported commit may carry: the prompt, the target and the subject."""
    return Fact(prompt=fact.prompt, target=fact.target, id=fact.id, subject=fact.subject)


def run(model, tokenizer, facts, config: EditConfig, generate: bool) -> tuple[dict, list[dict]]:
    detach(model)
    editor = Editor(model, tokenizer, config)
    began = time.perf_counter()
    keys = editor.keys([f.prompt for f in facts])
    batches = plan(keys, config.batch_size, config.plan, config.seed, groups=[f.subject or None for f in facts])
    stored = 0
    for batch in batches:
        artifact = editor.edit([edit_only(facts[i]) for i in batch])
        stored += sum(len(blob) for blob in artifact_to_blobs(artifact))
    seconds = time.perf_counter() - began
    scores = evaluate(model, tokenizer, facts, generate=generate)
    probe = [f.locality[0].prompt for f in facts[:50] if f.locality] + [f.prompt for f in facts[:50]]
    routed = forward_seconds(model, tokenizer, probe)
    with find_adaptor(model).bypassed():
        base = forward_seconds(model, tokenizer, probe)
    return {
        "T": len(facts),
        **scores.to_dict(),
        "mean": round(scores.mean, 4),
        "wild_mean": None if scores.wild_mean is None else round(scores.wild_mean, 4),
        "batches": len(batches),
        "s_per_fact": round(seconds / len(facts), 3),
        "bytes_per_fact": round(stored / len(facts)),
        "routed_over_base_forward": round(routed / base, 3),
    }, scores.samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/zsre_mend_eval.json")
    parser.add_argument("--records", default=None,
                        help="START:END slice of the data (e.g. 500:1000, CounterFact's reporting half)")
    parser.add_argument("--T", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--protocol", choices=("tf", "wild", "both"), default="both")
    parser.add_argument("--samples", type=Path, default=None, help="write every generated answer here (JSON)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--plan", default="cluster")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--key-layer", type=int, default=None, help="default: the engine's (~20%% depth)")
    parser.add_argument("--threshold", type=float, default=EditConfig.threshold)
    parser.add_argument("--subject-threshold", type=float, default=EditConfig.subject_threshold)
    parser.add_argument("--context-templates", type=int, default=EditConfig.context_templates)
    parser.add_argument("--lr", type=float, default=EditConfig.lr)
    parser.add_argument("--continuation-tokens", type=int, default=EditConfig.continuation_tokens)
    parser.add_argument("--max-steps", type=int, default=EditConfig.max_steps)
    parser.add_argument("--loss-floor", type=float, default=EditConfig.loss_floor)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lifelong.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    skipped: list[str] = []
    facts = load_facts(args.data, skipped=skipped)
    if args.records:
        first, last = (int(x) if x else None for x in args.records.split(":"))
        facts = facts[first:last]
    config = EditConfig(layer=args.layer, key_layer=args.key_layer, threshold=args.threshold,
                        subject_threshold=args.subject_threshold, context_templates=args.context_templates,
                        lr=args.lr, max_steps=args.max_steps, loss_floor=args.loss_floor,
                        continuation_tokens=args.continuation_tokens,
                        batch_size=args.batch_size, plan=args.plan, anchor_rephrases=False, locality_regulariser=False)
    generate = args.protocol != "tf"
    rows, samples = [], {}
    print(f"{args.data} [{args.records or ':'}]: {len(facts)} facts ({len(skipped)} invalid records skipped); {config}")
    print("| T | Rel | Gen | Loc | WILD Rel | WILD Gen | WILD Loc | fluency (base) | degenerate (base) "
          "| routed: rephrase | routed: loc→none | s/fact | bytes/fact | routed/base fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(row: dict, key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.3f}"

    for t in args.T:
        row, samples[t] = run(model, tokenizer, facts[:t], config, generate)
        rows.append(row)
        print(f"| {t} | {cell(row, 'rel')} | {cell(row, 'gen')} | {cell(row, 'loc')} | {cell(row, 'wild_rel')} | "
              f"{cell(row, 'wild_gen')} | {cell(row, 'wild_loc')} | {cell(row, 'fluency')} ({cell(row, 'base_fluency')}) | "
              f"{cell(row, 'degenerate')} ({cell(row, 'base_degenerate')}) | {cell(row, 'routing_rephrase')} | "
              f"{cell(row, 'routing_locality')} | {row['s_per_fact']:.3f} | {row['bytes_per_fact']:,} | "
              f"{row['routed_over_base_forward']:.2f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"commit": code_version(), "config": config.to_dict(), "data": args.data,
                                    "records": args.records,
                                    "protocol": args.protocol, "rows": rows}, indent=2))
    if args.samples:
        args.samples.write_text(json.dumps(samples, indent=1, ensure_ascii=False))

if __name__ == "__main__":
    main()
