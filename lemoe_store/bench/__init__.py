"""The side-by-side benchmark: LEMoE against FT-L, GRACE, WISE, MEMOIR and a conventional MoE adaptor (+ ablations).

Each peer is a small module behind one interface (`Method.edit(batch)`, `Method.model_for_eval()`) and
shares the engine's data loaders and metric code; `runner` runs them on the same model and facts. Names
load on first use, so the CLI can offer the method names without importing torch.
"""

from __future__ import annotations

import importlib

# Every method's id (what `--methods` takes) and the name its rows carry in tables, plots and READMEs.
TITLES = {
    "lemoe-anchors": "LEMoE with per-fact anchor routing (ours)",
    "lemoe-paper": "LEMoE (paper routing)",
    "lemoe-anchors-no-plan": "LEMoE with per-fact anchor routing, no order planning",
    "lemoe-learned-router": "LEMoE's frozen experts, learned router (no KV routing)",
    "moe": "Conventional MoE adaptor (learned router, nothing frozen)",
    "ft-l": "FT-L",
    "grace": "GRACE",
    "wise": "WISE",
    "wise-retrieve": "WISE-Retrieve",
    "memoir": "MEMOIR",
}
DEFAULT_METHODS = ("lemoe-anchors", "ft-l", "grace", "wise", "memoir", "moe")
PROTOCOLS = ("tf", "wild", "both")  # teacher-forced, free generation (WILD), both

_HOMES = {"BenchSettings": "base", "Method": "base", "METHODS": "runner", "Result": "runner", "run_grid": "runner",
          "save": "runner", "code_version": "runner", "irrelevant_pool": "runner", "resumable": "runner"}

__all__ = ["DEFAULT_METHODS", "PROTOCOLS", "TITLES", *sorted(_HOMES)]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
