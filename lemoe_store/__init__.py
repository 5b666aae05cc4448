"""lemoe-store: a git-like, versioned store for lifelong model editing of LLMs (LEMoE adaptors).

    from lemoe_store import Repo, load_facts, attach_version, disable_experts
    repo = Repo.init("my-edits")
    repo.commit(load_facts("facts.jsonl"), message="2024 facts")
    model = attach_version(my_model, "my-edits", "HEAD")

Names load on first use, so `import lemoe_store` (and the CLI's quick commands) never import torch.
"""

from __future__ import annotations

import importlib

from .errors import ConfigError, FactsError, LemoeError, ModelError, StoreError

__version__ = "0.1.0"

_HOMES = {
    "Repo": "repo", "Answer": "repo", "RouteInfo": "repo",
    "Fact": "schemas.facts", "Locality": "schemas.facts", "load_facts": "schemas.facts",
    "AdaptorConfig": "editing.config", "EditConfig": "editing.config",
    "attach_version": "export", "disable_experts": "export", "export_version": "export", "load_version": "export",
}

__all__ = ["ConfigError", "FactsError", "LemoeError", "ModelError", "StoreError", "__version__", *sorted(_HOMES)]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
