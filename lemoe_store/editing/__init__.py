"""The LEMoE engine: adaptor insertion, frozen experts, KV anchor routing, training, planning, metrics.

Usable on its own from a notebook:

    from lemoe_store.editing import EditConfig, Editor, evaluate, plan
    editor = Editor(model, tokenizer, EditConfig(layer=18))
    artifact = editor.edit(facts[:10])          # one new frozen expert
    print(evaluate(model, tokenizer, facts[:10]))

This package knows nothing about storage; `lemoe_store.repo` persists what it trains.
"""

from .adaptor import Expert, ExpertArtifact, LemoeAdaptor, attach, detach, find_adaptor, reattach
from .config import PLANS, EditConfig
from .editor import Editor
from .metrics import Scores, evaluate
from .planning import plan

__all__ = [
    "PLANS",
    "EditConfig",
    "Editor",
    "Expert",
    "ExpertArtifact",
    "LemoeAdaptor",
    "Scores",
    "attach",
    "detach",
    "evaluate",
    "find_adaptor",
    "plan",
    "reattach",
]
