"""The side-by-side benchmark: LEMoE against FT-L, GRACE, WISE and a conventional MoE adaptor (+ ablations).

Each peer is a small module behind one interface (`Method.edit(batch)`, `Method.model_for_eval()`) and
shares the engine's data loaders and metric code; `runner` runs them on the same model and facts.
"""

from .base import BenchSettings, Method
from .runner import DEFAULT_METHODS, METHODS, Result, run_grid, save

__all__ = ["DEFAULT_METHODS", "METHODS", "BenchSettings", "Method", "Result", "run_grid", "save"]
