"""Why WISE and MEMOIR miss edits on this model: one fact at a time, each on a fresh memory (T = 1), is the
edit learned at all, and is it read back?

    python benchmarks/peer_single_edits.py --method wise --facts 8
    python benchmarks/peer_single_edits.py --method memoir --facts 8 --steps 120

For each of the first `--facts` facts of a tuning split (edits carry `prompt`, `target`, `subject` only),
a fresh editor edits that fact alone; then the edit prompt's answer is read teacher-forced twice:
- *memory forced*: every position reads the memory the edit trained (WISE's side memory W', MEMOIR's
  residual memory through the edit's mask), so a miss here is a miss of training, not of routing;
- *routed*: as the benchmark scores it (WISE's activation threshold, MEMOIR's mask overlap τ).
It prints, per fact, the steps the edit took (of its budget), the last training loss, the answer's NLL
and token accuracy both ways, and whether the prompt was routed to the memory; for WISE also the
activation gap d (of W' against W) over the prompt's tokens, over prompt + answer, and the threshold
(act_ratio × the smallest d an edit had in training) that routing compares d with. `--steps` replaces the
method's step budget (the reference's: WISE 70, MEMOIR 30) to show whether a larger one learns the
edit; every other setting is the grid's. The irrelevant prompts (WISE's margins, MEMOIR's background)
are the locality prompts of records `--irrelevant` of the same file, never edited.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from lemoe_store.bench import BenchSettings, irrelevant_pool
from lemoe_store.bench import memoir as memoir_module
from lemoe_store.bench import wise as wise_module
from lemoe_store.bench.runner import code_version, make_method
from lemoe_store.editing.batching import encode_pair, teacher_forced, token_accuracy
from lemoe_store.models import load_model
from lemoe_store.schemas.facts import Fact

sys.path.insert(0, str(Path(__file__).resolve().parent))
from never_edited import records_and_never_edited  # noqa: E402

MODULES = {"wise": wise_module, "memoir": memoir_module}


@contextmanager
def memory_forced(method, tokens: torch.Tensor):
    """Within: every row reads the memory the last edit wrote (the methods' own training-time switch); WISE
    also measures its activation gap d over `tokens` ((1, length) mask) into `memory.last_distances`."""
    memory = method.memory
    if method.name == "wise":
        memory.training_tokens = tokens
        try:
            yield
        finally:
            memory.training_tokens = None
    else:
        memory.training_mask = memory.edit_masks[-1]
        try:
            yield
        finally:
            memory.training_mask = None


def routed_to_memory(method) -> bool:
    """After a prefill: did the prompt read the edited memory?"""
    memory = method.memory
    if method.name == "wise":
        return bool(memory._reading is not None and int(memory._reading[0]) != wise_module.MAIN)
    return bool(memory.last_overlaps[0] >= memory.threshold)


@torch.no_grad()
def wise_gaps(method, tokenizer, pair, everything: torch.Tensor) -> dict:
    """WISE's activation gap d of W' on the edit prompt, over its tokens alone (what routing sees before an
    answer exists) and over prompt + answer (what the reference's teacher-forced routing sees), and the
    threshold both are compared with."""
    prompt_only = everything.clone()
    prompt_only[:, len(pair.prompt):] = 0
    gaps = {}
    for name, tokens in (("d_prompt", prompt_only), ("d_prompt_answer", everything)):
        with memory_forced(method, tokens):
            teacher_forced(method.model, tokenizer, [pair])
        gaps[name] = round(float(method.memory.last_distances[0]), 3)
    return gaps | {"threshold": round(method.memory.threshold(), 3)}


class Recorder:
    """Wraps `train_answers` in the method's module: keeps the steps each edit took and its losses."""

    def __init__(self, module) -> None:
        self.module, self.train = module, module.train_answers
        self.steps: list[int] = []
        self.losses: list[float] = []

    def __enter__(self) -> Recorder:
        def recorded(*args, stop_when, **kwargs):
            self.losses.clear()

            def watch(loss: float) -> bool:
                self.losses.append(loss)
                return stop_when(loss)

            steps = self.train(*args, stop_when=watch, **kwargs)
            self.steps.append(steps)
            return steps

        self.module.train_answers = recorded
        return self

    def __exit__(self, *exc) -> None:
        self.module.train_answers = self.train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(MODULES), required=True)
    parser.add_argument("--data", default="../shared/data/zsre_mend_train-1k.json")
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="step budget per edit (default: the method's)")
    parser.add_argument("--irrelevant", default="500:1000", help="START:END records whose locality prompts are irrelevant inputs")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    records, never_edited = records_and_never_edited(parser, args.data, args.irrelevant, args.facts, "--irrelevant")
    model, tokenizer = load_model(args.model)
    irrelevant = irrelevant_pool(tokenizer, never_edited)
    module = MODULES[args.method]
    rows = []
    with Recorder(module) as recorder:
        for fact in records[: args.facts]:
            edit = Fact(prompt=fact.prompt, target=fact.target, id=fact.id, subject=fact.subject)
            torch.manual_seed(0)
            method = make_method(args.method, model, tokenizer, BenchSettings(), irrelevant)
            budget = args.steps or method.steps.max_steps
            method.steps = replace(method.steps, max_steps=budget)
            try:
                began = time.perf_counter()
                method.edit([edit])
                seconds = time.perf_counter() - began
                pair = encode_pair(tokenizer, fact.prompt, fact.target)
                everything = torch.ones(1, len(pair.prompt) + len(pair.answer))
                with memory_forced(method, everything):
                    (forced,) = teacher_forced(model, tokenizer, [pair])
                gaps = wise_gaps(method, tokenizer, pair, everything) if method.name == "wise" else {}
                (routed,) = teacher_forced(model, tokenizer, [pair])
                reads = routed_to_memory(method)
            finally:
                method.close()
            rows.append({"prompt": fact.prompt, "target": fact.target, "steps": recorder.steps[-1], "budget": budget,
                         "last_loss": round(recorder.losses[-1], 4), "forced_nll": round(forced.nll, 4),
                         "forced_acc": token_accuracy(forced.predictions, pair.answer), "routed_nll": round(routed.nll, 4),
                         "routed_acc": token_accuracy(routed.predictions, pair.answer), "routed_to_memory": reads,
                         "seconds": round(seconds, 1), **gaps})
            row = rows[-1]
            gap = f" {gaps['d_prompt']:.2f} / {gaps['d_prompt_answer']:.2f} / {gaps['threshold']:.2f} |" if gaps else ""
            print(f"| {row['prompt'][:48]} → {row['target'][:24]} | {row['steps']} / {budget} | {row['last_loss']:.3f} | "
                  f"{row['forced_nll']:.3f} / {row['forced_acc']:.2f} | {row['routed_nll']:.3f} / {row['routed_acc']:.2f} | "
                  f"{'yes' if reads else 'no'} |{gap} {row['seconds']} |", flush=True)
    mean = {key: round(sum(r[key] for r in rows) / len(rows), 3) for key in ("forced_acc", "routed_acc", "steps")}
    print(f"mean: steps {mean['steps']} of {rows[0]['budget']}, token accuracy memory forced {mean['forced_acc']}, "
          f"routed {mean['routed_acc']}; routed to the memory {sum(r['routed_to_memory'] for r in rows)} of {len(rows)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"commit": code_version(), "args": {k: str(v) for k, v in vars(args).items()},
                                        "mean": mean, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
