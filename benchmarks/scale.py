"""A history of 10,000 facts on the embedded model (issue 19): build it, then time what users do with it.

    python benchmarks/scale.py --store /tmp/scale [--facts 10000] [--speed-facts 100]

Facts: every record of the real sets (ZsRE eval and train, CounterFact, hallucination: about 3,300), then
templated synthetic facts (ids `synthetic-N`, invented subjects, labelled as such) up to `--facts`. Commits
carry only prompt, target and subject, batch 10 (default settings, except `--max-steps` if given: the
store-scale figures below depend on the number of experts and anchors, not on how long each trained), one
`commit` call per 500 facts, so the history has about 1,000 commits and 1,000 experts. The build resumes
where an earlier run stopped.

Then it measures:
- commit seconds per fact on `--speed-facts` further synthetic facts in fresh stores: in turn, 2 local
  workers, a local Ray cluster of 2 CPUs (the build's own s/fact is reported too);
- cold checkout: a fresh process loading HEAD and HEAD~500 (`Repo.model_at`) against a bare model load;
- the routed forward at HEAD (1,000 experts) against the base model, on edit prompts and unrelated ones;
- bytes per fact (the store's objects; experts and anchors alone);
- `lemoe log`, `lemoe blame` latency (fresh CLI processes) and the warm Python calls.
Results go to benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lemoe_store import Fact, Repo, disable_experts, load_facts
from lemoe_store.bench import code_version

sys.path.insert(0, str(Path(__file__).parent))
from lifelong import forward_seconds  # noqa: E402
from parallel_commit import timed_commit  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SETS = ("zsre_mend_eval.json", "zsre_mend_train-1k.json", "counterfact-edit-1k.json", "hallucination-edit-300.json")
CHUNK = 500
FORWARD_PASSES = 7
LEMOE = [sys.executable, "-m", "lemoe_store"]

SYLLABLES = "ka lo mi ren tas vel dor shi pra nu bel zan ov eth quin ral sor tem ula ix".split()
RELATIONS = [  # (prompt template, answers)
    ("The capital of {} is", "Oslo Lima Quito Accra Hanoi Riga Sofia Dakar Perth Bern".split()),
    ("{} was born in the city of", "Lyon Porto Kyoto Cork Turin Graz Leeds Gdansk Malmo Tartu".split()),
    ("The chief executive of {} is", "Amara Bello Chen Dubois Eriksen Farah Gupta Haddad Ito Jansen".split()),
    ("{} is a professional player of", "cricket hockey tennis rugby golf chess volleyball squash polo judo".split()),
    ("The official language of {} is", "Finnish Tagalog Basque Welsh Swahili Icelandic Maltese Latvian Yoruba Khmer".split()),
    ("{} was founded in the year", [str(y) for y in range(1901, 2001, 10)]),
]


def synthetic_facts(count: int, start: int = 0, seed: int = 19) -> list[Fact]:
    """Templated facts about invented subjects (three syllables: 8,000 distinct names per relation)."""
    rng = random.Random(seed)
    facts = []
    for n in range(start + count):
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        template, answers = RELATIONS[n % len(RELATIONS)]
        target = rng.choice(answers)
        if n >= start:
            facts.append(Fact(prompt=template.format(name), target=target, subject=name, id=f"synthetic-{n}"))
    return facts


def history_facts(total: int) -> list[Fact]:
    """The real records first, then synthetic ones; one fact per prompt (a prompt asked twice with two
    targets is a conflict `commit` refuses: the first record is kept)."""
    real: dict[str, Fact] = {}
    for name in REAL_SETS:
        for f in load_facts(DATA / name, skipped=[]):
            real.setdefault(f.prompt, Fact(prompt=f.prompt, target=f.target, subject=f.subject,
                                           id=f"{Path(name).stem}-{f.id}"))
    synthetic: dict[str, Fact] = {}
    for f in synthetic_facts(max(0, 2 * (total - len(real)))):  # twice the need: invented names can repeat
        if f.prompt not in real:
            synthetic.setdefault(f.prompt, f)
    return (list(real.values()) + list(synthetic.values()))[:total]


def build(repo: Repo, facts: list[Fact]) -> dict:
    done = len(repo.facts_at()) if repo.head()[1] else 0
    print(f"history: {done} of {len(facts)} facts committed", flush=True)
    seconds = 0.0
    for start in range(done, len(facts), CHUNK):
        chunk = facts[start : start + CHUNK]
        began = time.perf_counter()
        repo.commit(chunk, message=f"scale: facts {start}-{start + len(chunk) - 1}")
        seconds += time.perf_counter() - began
        print(f"  {start + len(chunk)} facts, {seconds / (start + len(chunk) - done):.3f} s/fact", flush=True)
    built = len(facts) - done
    return {"facts_committed_now": built, "s_per_fact": round(seconds / built, 4) if built else None}


def commit_speed(count: int, start: int) -> dict:
    facts = synthetic_facts(count, start=start)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, parallel in (("in turn", {}), ("2 local workers", {"workers": 2}),
                               ("Ray, local cluster of 2 CPUs", {"ray": "local", "workers": 2})):
            _, seconds = timed_commit(Path(scratch) / name.split()[0], facts, **parallel)
            rows[name] = round(seconds / count, 4)
            print(f"  commit {name}: {rows[name]} s/fact", flush=True)
    return rows


def _in_fresh_process(code: str, store: Path, repeats: int = 3) -> float:
    """Median seconds that `code` (which sets `seconds`) reports from fresh interpreters."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code + "\nprint(seconds)"], cwd=store, check=True,
                             capture_output=True, text=True).stdout
        runs.append(float(out.strip().splitlines()[-1]))
    return statistics.median(runs)


def cold_checkout(repo: Repo, store: Path) -> dict:
    back = f"HEAD~{min(500, len(repo.log()) - 1)}"
    timer = "import time\nfrom lemoe_store import Repo\nfrom lemoe_store.models import load_model\nbegan = time.perf_counter()\n"
    rows = {"bare model load": _in_fresh_process(timer + "load_model('smollm2-135m')\nseconds = time.perf_counter() - began", store)}
    for rev in ("HEAD", back):
        rows[f"model_at({rev})"] = _in_fresh_process(
            timer + f"Repo.open('.').model_at('{rev}')\nseconds = time.perf_counter() - began", store)
    bare = rows["bare model load"]
    for name, seconds in list(rows.items()):
        print(f"  {name}: {seconds:.2f} s ({seconds / bare:.2f}x bare)", flush=True)
    return {name: {"s": round(s, 3), "x_bare": round(s / bare, 3)} for name, s in rows.items()}


def routed_forward(repo: Repo, facts: list[Fact]) -> dict:
    model, tokenizer = repo.model_at("HEAD")
    experts = len(repo.get_commit("HEAD").tree)
    prompts = {"edit prompts": [f.prompt for f in random.Random(0).sample(facts, min(50, len(facts)))],
               "unrelated prompts": ["The weather today is", "My favourite food is", "Water boils at",
                                     "The first president of the United States was", "A week has"] * 10}
    rows = {"experts": experts}
    for name, batch in prompts.items():
        # Alternating passes, best of each: this machine's speed drifts by ±15 % between consecutive
        # passes, which one block of routed passes then one of base passes read as a ratio.
        routed = base = float("inf")
        for _ in range(FORWARD_PASSES):
            routed = min(routed, forward_seconds(model, tokenizer, batch, repeats=1))
            with disable_experts(model):
                base = min(base, forward_seconds(model, tokenizer, batch, repeats=1))
        rows[name] = {"routed_ms": round(1000 * routed / len(batch), 2), "base_ms": round(1000 * base / len(batch), 2),
                      "ratio": round(routed / base, 3)}
        print(f"  forward, {name}: {rows[name]}", flush=True)
    return rows


def sizes(repo: Repo, store: Path) -> dict:
    facts = len(repo.facts_at())
    objects = sum(p.stat().st_size for p in (store / ".lemoe" / "objects").rglob("*") if p.is_file())
    rows = repo.store.db["experts"].rows  # the index records each expert's and anchors' bytes
    experts = sum(row["bytes"] for row in rows)
    result = {"facts": facts, "bytes_per_fact_objects": round(objects / facts), "bytes_per_fact_experts": round(experts / facts)}
    print(f"  sizes: {result}", flush=True)
    return result


def _cli_seconds(store: Path, *args: str, repeats: int = 3) -> float:
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([*LEMOE, *args], cwd=store, check=True, capture_output=True)
        runs.append(time.perf_counter() - began)
    return round(statistics.median(runs), 3)


def latency(repo: Repo, store: Path, facts: list[Fact]) -> dict:
    probe = facts[len(facts) // 2]
    rows = {
        "lemoe log -n 20": _cli_seconds(store, "log", "-n", "20"),
        "lemoe log --json (every commit)": _cli_seconds(store, "log", "--json"),
        "lemoe blame --fact ID": _cli_seconds(store, "blame", "--fact", probe.id),
        "lemoe blame QUERY (loads the model)": _cli_seconds(store, "blame", probe.prompt, repeats=1),
    }
    for name, call in (("Repo.log() (every commit)", lambda: repo.log()),
                       ("Repo.blame(QUERY), warm", lambda: repo.blame(probe.prompt))):
        call()
        began = time.perf_counter()
        call()
        rows[name] = round(time.perf_counter() - began, 3)
    for name, seconds in rows.items():
        print(f"  {name}: {seconds} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="where the history is built (kept: resumable)")
    parser.add_argument("--facts", type=int, default=10_000)
    parser.add_argument("--speed-facts", type=int, default=100, help="0: skip the commit-speed runs")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps per expert for the history's build (default: the store's default); "
                             "the commit-speed runs always use the defaults")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    store = args.store.resolve()
    settings = {"max_steps": args.max_steps} if args.max_steps else {}
    repo = Repo.open(store) if (store / ".lemoe").is_dir() else Repo.init(store, **settings)
    facts = history_facts(args.facts)
    result = {"commit": code_version(), "facts": len(facts), "build_max_steps": repo.config.max_steps,
              "synthetic": sum(f.id.startswith("synthetic-") for f in facts)}
    result["build"] = build(repo, facts)
    if args.speed_facts:
        result["commit_speed_s_per_fact"] = commit_speed(args.speed_facts, start=args.facts)
    result["cold_checkout"] = cold_checkout(repo, store)
    result["routed_forward"] = routed_forward(repo, facts)
    result["size"] = sizes(repo, store)
    result["latency_s"] = latency(repo, store, facts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
