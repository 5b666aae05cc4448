"""Load on `lemoe serve`: latency and throughput at 1, 4 and 8 concurrent clients, against in-process generate.

    python benchmarks/serve_load.py [--store PATH] [--requests 48] [--max-tokens 16] [--out FILE]

Without --store it builds a store with the sample facts on the embedded model (in a temporary directory).
The prompts are the sample facts' prompts, rephrases and locality prompts, so both routed and base answers
are timed. First every prompt is generated in this process with the server's own engine (no HTTP), then
the same prompts go through a `lemoe serve` subprocess with the official `openai` client, greedy, in turn
at each concurrency (the other side is idle meanwhile). Serving overhead = served p50 at 1 client over
in-process p50, minus one.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import httpx
import openai

from lemoe_store.repo import Repo
from lemoe_store.schemas.facts import load_facts
from lemoe_store.serve.engine import Engine, Sampling


def sample_store(directory: Path) -> Path:
    repo = Repo.init(directory)
    repo.commit(load_facts(resources.files("lemoe_store") / "samples" / "facts.jsonl"), message="sample facts",
                batch_size=6)
    return repo.store.root


def prompts_of(repo: Repo) -> list[str]:
    facts = repo.facts_at()
    found = [f.prompt for f in facts] + [r for f in facts for r in f.rephrases] + [l.prompt for f in facts for l in f.locality]
    return list(dict.fromkeys(found))


def summary(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "p50_s": round(statistics.median(ordered), 4),
            "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 4),
            "requests_per_s": round(len(ordered) / wall, 3)}


def in_process(repo: Repo, prompts: list[str], max_tokens: int) -> dict:
    engine = Engine(repo)
    cid = repo.resolve("HEAD")

    def one(prompt: str) -> float:
        began = time.perf_counter()
        engine.generate(cid, engine.encode_completion(prompt), Sampling(max_tokens))
        return time.perf_counter() - began

    def run() -> dict:
        one(prompts[0])  # warm up: experts loaded, first-call costs paid
        began = time.perf_counter()
        latencies = [one(p) for p in prompts]
        return summary(latencies, time.perf_counter() - began)

    try:
        return engine.submit(run).result()
    finally:
        engine.close()


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from lemoe_store.cli import main; main()", "serve", "--store", str(store),
               "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("lemoe serve did not come up")


def served(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def one(prompt: str) -> float:
        began = time.perf_counter()
        client.completions.create(model="lemoe:HEAD", prompt=prompt, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - began

    one(prompts[0])  # warm up
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, prompts))
    return summary(latencies, time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store = args.store or sample_store(Path(scratch))
        repo = Repo.open(store)
        base = prompts_of(repo)
        prompts = [base[i % len(base)] for i in range(args.requests)]
        rows = {"in-process generate": in_process(repo, prompts, args.max_tokens)}
        process, url = start_server(repo.store.root)
        try:
            for clients in (1, 4, 8):
                rows[f"served, {clients} client(s)"] = served(url, prompts, clients, args.max_tokens)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    local, one_client = rows["in-process generate"], rows["served, 1 client(s)"]
    result = {
        "rows": rows,
        "overhead_at_1_client": round(one_client["p50_s"] / local["p50_s"] - 1, 4),
        "throughput_8_over_1": round(rows["served, 8 client(s)"]["requests_per_s"] / one_client["requests_per_s"], 3),
        "max_tokens": args.max_tokens,
        "distinct_prompts": len(base),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':24} {'p50 s':>8} {'p95 s':>8} {'req/s':>8}")
    for name, row in rows.items():
        print(f"{name:24} {row['p50_s']:8.3f} {row['p95_s']:8.3f} {row['requests_per_s']:8.2f}")
    print(f"serving overhead at 1 client: {result['overhead_at_1_client']:+.1%}; "
          f"throughput 8 clients / 1 client: {result['throughput_8_over_1']:.2f}")


if __name__ == "__main__":
    main()
