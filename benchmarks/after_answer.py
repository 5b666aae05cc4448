"""Does the text after an edited answer read as the base model's? The expert's leftover push, measured.

    python benchmarks/after_answer.py --data ../shared/data/zsre_mend_train-1k.json --facts 50 --continuation-tokens 3

Edits the first N facts (prompt, target and subject only) in batches of 10 with the engine's defaults but
`--continuation-tokens`, then, for every edit whose greedy answer is exactly the target's tokens, compares
the next tokens with the base model's greedy continuation of prompt + target: the share where the first
token agrees, and where all `--after` tokens do. Fluency scores only how varied a continuation is; this
says whether it is still the base model's text (the aim of `EditConfig.continuation_tokens`).
"""

from __future__ import annotations

import argparse
import time

import torch

from lemoe_store.editing import EditConfig, Editor
from lemoe_store.editing.batching import encode_pair, greedy_continuations
from lemoe_store.models import load_model
from lemoe_store.schemas.facts import Fact, load_facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--facts", type=int, default=50, help="the first N facts (tuning splits: ZsRE train, CF 0-499)")
    parser.add_argument("--continuation-tokens", type=int, default=EditConfig.continuation_tokens)
    parser.add_argument("--after", type=int, default=4, help="tokens compared after the answer")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    facts = [Fact(prompt=f.prompt, target=f.target, id=f.id, subject=f.subject)
             for f in load_facts(args.data, skipped=[])[: args.facts]]
    pairs = [encode_pair(tokenizer, f.prompt, f.target) for f in facts]
    base_after = [tokens for tokens, _ in greedy_continuations(model, tokenizer, pairs, args.after)]
    editor = Editor(model, tokenizer, EditConfig(anchor_rephrases=False, locality_regulariser=False,
                                                 continuation_tokens=args.continuation_tokens))
    began = time.perf_counter()
    for start in range(0, len(facts), 10):
        editor.edit(facts[start : start + 10])
    seconds = (time.perf_counter() - began) / len(facts)

    answered = first = whole = 0
    for pair, expected in zip(pairs, base_after):
        ids = torch.tensor([pair.prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=len(pair.answer) + args.after, pad_token_id=tokenizer.pad_token_id)
        tokens = out[0, ids.shape[1] :].tolist()
        if tokens[: len(pair.answer)] != pair.answer:
            continue
        answered += 1
        after = tokens[len(pair.answer) :]
        first += after[:1] == expected[:1]
        whole += after == expected
    print(f"{args.data} first {len(facts)}, continuation tokens {args.continuation_tokens}: {answered} answered "
          f"with the target; first token after it = base {first / answered:.2f}, {args.after} tokens after = "
          f"base {whole / answered:.2f}; {seconds:.3f} s per fact training")


if __name__ == "__main__":
    main()
