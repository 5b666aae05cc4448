"""GPU smoke run (issue 19): commit 100 facts, evaluate both protocols and answer one served request on CUDA.

    python benchmarks/gpu_smoke.py [--facts 100] [--model smollm2-135m] [--allow-cpu]

The store is made with `device="auto"` (the GPU) and the model in bfloat16 (what `auto` picks on a GPU that
supports it; experts compute in float32). Facts: the ZsRE training split's first records, prompt, target and
subject only. Prints one JSON object (device, dtype, s/fact, teacher-forced and WILD scores, the served
answer and its latency) and writes it to benchmarks/results/gpu_smoke.json. Without a GPU it stops with a
one-line message, unless `--allow-cpu` (to check the script itself on a machine without one).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from lemoe_store import Fact, Repo, load_facts
from lemoe_store.bench import code_version

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_train-1k.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def served_answer(store: Path, prompt: str) -> dict:
    """Start `lemoe serve` on the store, ask one completion with the official client, stop the server."""
    from openai import OpenAI

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lemoe_store", "serve", "--store", str(store), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"lemoe serve exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("lemoe serve did not come up in 300 s") from None
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        began = time.perf_counter()
        completion = client.completions.create(model="lemoe", prompt=prompt, max_tokens=16, temperature=0)
        seconds = time.perf_counter() - began
        return {"prompt": prompt, "text": completion.choices[0].text, "seconds": round(seconds, 3),
                "provenance": completion.model_extra.get("lemoe")}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (checks the script only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_smoke.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("gpu_smoke: no CUDA device here (torch.cuda.is_available() is False); --allow-cpu runs it on CPU")
    facts = [Fact(prompt=f.prompt, target=f.target, subject=f.subject, id=f.id)
             for f in load_facts(args.data, skipped=[])[: args.facts]]
    evaluation = load_facts(args.data, skipped=[])[: args.facts]  # the same facts with rephrases and locality
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        repo = Repo.init(store, model=args.model)
        model, _ = repo.base_model()
        parameter = next(model.parameters())
        began = time.perf_counter()
        repo.commit(facts, message="gpu smoke")
        commit_seconds = time.perf_counter() - began
        began = time.perf_counter()
        scores = repo.evaluate(evaluation, generate=True)
        eval_seconds = time.perf_counter() - began
        del repo, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result = {
            "commit": code_version(),
            "device": torch.cuda.get_device_name(0) if parameter.is_cuda else "cpu",
            "dtype": str(parameter.dtype),
            "facts": len(facts),
            "s_per_fact": round(commit_seconds / len(facts), 4),
            "eval_seconds": round(eval_seconds, 1),
            "scores": scores.to_dict(),
            "served": served_answer(store, facts[0].prompt),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
