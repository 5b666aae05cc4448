"""Settings of the LEMoE engine, shared by training and inference so both route the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ROUTINGS = ("kv-anchor",)
PLANS = ("cluster", "original", "random", "reverse")


@dataclass
class EditConfig:
    """Hyper-parameters of one LEMoE adaptor.

    layer: index of the decoder layer whose MLP gets the adaptor (None: ~60% depth).
    rank: hidden width of each expert (hidden -> rank -> hidden).
    threshold: cosine similarity a query key needs with its nearest anchor to be routed (tau).
    scale: lambda, the weight of the routed expert's output.
    anchor_rephrases: train a fact's rephrases too and store their keys as anchors of its expert.
    locality_regulariser: a fact's locality prompts that route to its expert are trained to keep the
        base model's predictions. (Benchmarks turn both off: there rephrases and locality prompts are
        held-out evaluation data.)
    """

    layer: int | None = None
    rank: int = 64
    threshold: float = 0.9
    scale: float = 1.0
    routing: str = "kv-anchor"
    lr: float = 3e-2
    max_steps: int = 40
    loss_floor: float = 0.1
    anchor_rephrases: bool = True
    locality_regulariser: bool = True
    seed: int = 0
    batch_size: int = 10
    plan: str = "cluster"
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {self.routing!r}")
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, not {self.plan!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if self.rank < 1 or self.batch_size < 1 or self.max_steps < 1:
            raise ValueError("rank, batch_size and max_steps must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def resolved_layer(self, num_layers: int) -> int:
        layer = round(0.6 * num_layers) if self.layer is None else self.layer
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is outside the model's {num_layers} layers")
        return layer
