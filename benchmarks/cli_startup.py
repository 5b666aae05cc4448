"""Wall time of the quick CLI commands, against `python -c pass` (median of 5 runs each).

    python benchmarks/cli_startup.py [--store PATH]

Without --store it builds a two-commit store on a tiny random model (the commands read the store only, so
the model's size does not matter). Quick commands must import neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = [["--help"], ["log"], ["show", "HEAD"], ["status"], ["branch"], ["tag", "-l"], ["diff", "HEAD~1", "HEAD"],
            ["fsck"], ["gc"], ["remote", "list"], ["audit"]]


def timed(command: list[str], env: dict) -> float:
    runs = []
    for _ in range(5):
        began = time.perf_counter()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        runs.append(time.perf_counter() - began)
    return statistics.median(runs)


def tiny_store(directory: Path) -> Path:
    """A store over a random 2-layer Llama with two commits."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lemoe_store import Fact, Repo

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["The capital of Atlantis is Poseidonia. Lena plays volleyball."] * 4,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    model_dir = directory / "model"
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    repo = Repo.init(directory / "work", model=str(model_dir), layer=1, rank=4, max_steps=2, batch_size=1,
                     plan="original")
    repo.commit([Fact(prompt="The capital of Atlantis is", target="Rome"),
                 Fact(prompt="Lena plays", target="cricket")], message="two facts")
    return repo.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path)
    args = parser.parse_args()
    lemoe = str(Path(sys.executable).parent / "lemoe")
    with tempfile.TemporaryDirectory() as scratch:
        store = args.store or tiny_store(Path(scratch))
        env = {**os.environ, "LEMOE_DIR": str(store)}
        baseline = timed([sys.executable, "-c", "pass"], env)
        print(f"{'python -c pass':28} {baseline:6.3f} s")
        for command in COMMANDS:
            print(f"{'lemoe ' + ' '.join(command):28} {timed([lemoe, *command], env):6.3f} s")


if __name__ == "__main__":
    main()
