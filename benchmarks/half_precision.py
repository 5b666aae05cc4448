"""How experts are stored: do Rel/Gen/Loc (both protocols) stay within 0.005 of the experts as trained?

    python benchmarks/half_precision.py [--data ../shared/data/zsre_mend_train-1k.json] [--T 300]

Trains the first T facts of a tuning split (prompt, target, subject; batch 10, cluster plan) once, in fp32,
keeping whole key readers, then scores the same experts as trained, with their weights rounded to float16
and to bfloat16, and rounded to float16 with the key readers stored as their images at the anchors (what
the engine stores now; see `adaptor.compact_key_readers`): what storing them so and loading them back
gives. Reports every metric, the largest change against fp32, and the bytes per fact each storage takes
(expert + anchor blobs; anchors stay fp32).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from lemoe_store.bench import code_version
from lemoe_store.editing import EditConfig, Editor, attach, detach, evaluate, plan
from lemoe_store.editing import editor as engine
from lemoe_store.editing.adaptor import compact_key_readers
from lemoe_store.editing.metrics import base_generations
from lemoe_store.models import load_model
from lemoe_store.plumbing import artifact_to_blobs
from lemoe_store.schemas.facts import Fact, load_facts

METRICS = ("rel", "gen", "loc", "wild_rel", "wild_gen", "wild_loc")
TOLERANCE = 0.005


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/zsre_mend_train-1k.json")
    parser.add_argument("--T", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/half_precision.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    facts = load_facts(args.data, skipped=[])[: args.T]
    config = EditConfig(layer=18, anchor_rephrases=False, locality_regulariser=False, expert_dtype="float32")
    base = base_generations(model, tokenizer, facts)
    editor = Editor(model, tokenizer, config)
    keys = editor.keys([f.prompt for f in facts])
    # The experts exactly as trained: whole key readers, not the images the engine would store of them.
    with mock.patch.object(engine, "compact_key_readers", lambda weights, _anchors: weights):
        artifacts = [editor.edit([Fact(prompt=facts[i].prompt, target=facts[i].target, id=facts[i].id,
                                       subject=facts[i].subject) for i in batch])
                     for batch in plan(keys, config.batch_size, config.plan, config.seed,
                                       groups=[f.subject or None for f in facts])]
    storages = {"float32": (torch.float32, False), "float16": (torch.float16, False),
                "bfloat16": (torch.bfloat16, False), "float16, key images": (torch.float16, True)}
    rows = {}
    for name, (dtype, images) in storages.items():
        stored = [replace(a, weights={k: v.to(dtype) for k, v in a.weights.items()}) for a in artifacts]
        if images:
            stored = [replace(a, weights=compact_key_readers(a.weights, a.anchors)) for a in stored]
        detach(model)
        attach(model, [replace(a, weights={k: v.float() for k, v in a.weights.items()}) for a in stored], config)
        scores = evaluate(model, tokenizer, facts, generate=True, base=base)
        row = {k: v for k, v in scores.to_dict().items() if k in METRICS or k in ("fluency", "degenerate")}
        row["bytes_per_fact"] = round(sum(len(b) for a in stored for b in artifact_to_blobs(a)) / len(facts))
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    for row in rows.values():
        row["largest_change"] = round(max(abs(row[m] - rows["float32"][m]) for m in METRICS), 4)
        row["within_tolerance"] = row["largest_change"] <= TOLERANCE
    result = {"commit": code_version(), "data": args.data, "T": len(facts), "tolerance": TOLERANCE, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
