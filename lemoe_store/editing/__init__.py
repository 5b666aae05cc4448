"""The LEMoE engine: adaptor insertion, frozen experts, KV anchor routing, training, planning, metrics.

Usable on its own from a notebook:

    from lemoe_store.editing import EditConfig, Editor, evaluate, plan
    editor = Editor(model, tokenizer, EditConfig(layer=18))
    artifact = editor.edit(facts[:10])          # one new frozen expert
    print(evaluate(model, tokenizer, facts[:10]))

This package knows nothing about storage; `lemoe_store.repo` persists what it trains. Names load on first
use, so `EditConfig` (plain settings) comes without importing torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "Expert": "adaptor", "ExpertArtifact": "adaptor", "LemoeAdaptor": "adaptor", "attach": "adaptor",
    "detach": "adaptor", "find_adaptor": "adaptor", "reattach": "adaptor",
    "PLANS": "config", "AdaptorConfig": "config", "EditConfig": "config",
    "Editor": "editor",
    "Scores": "metrics", "evaluate": "metrics",
    "plan": "planning",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
