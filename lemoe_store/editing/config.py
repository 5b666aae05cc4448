"""Settings of the LEMoE engine: the adaptor's (shared by training and inference, so both route the same
way) and, on top of them, training and planning."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

ROUTINGS = ("kv-anchor", "kv-anchor-paper")
EXPERT_DTYPES = ("float32", "float16", "bfloat16")
PLANS = ("cluster", "subject", "original", "random", "reverse")


@dataclass
class AdaptorConfig:
    """What a loaded version needs to answer (attach, export, serve): where the adaptor sits, how queries
    are routed, the experts' shape.

    layer: index of the decoder layer whose MLP gets the adaptor (None: ~60% depth).
    key_layer: index of the decoder layer whose MLP input gives the routing keys (None: ~20% depth, and
        never above `layer`). Early layers still read mostly *what* a prompt is about (its subject and
        relation words), so a rephrase lands next to its fact; by the adaptor's depth keys drift towards
        the prompt's phrasing. On the ZsRE training split, rephrases routed to their own expert: 0.95 with
        keys at layer 6 of SmolLM2's 30, 0.76 at layer 18.
    rank: hidden width of each expert (hidden -> rank -> hidden).
    threshold: cosine similarity a query key needs with its nearest anchor to be routed (tau), for anchors
        of facts without a subject.
    subject_threshold: the same for anchors of facts with a subject, which only queries containing that
        subject can match at all (see `routing.py`). On the tuning splits (ZsRE train, CounterFact 0-499)
        rephrases reached their own anchor 0.99 / 0.98 of the time at 0.6, neighbours with another subject
        almost never (0 / 0.02), whatever the threshold.
    scale: lambda, the weight of the routed expert's output.
    routing: "kv-anchor" (ours: per-fact anchor keys, nearest anchor above `threshold`, else the base
        model) or "kv-anchor-paper" (the paper's: one learned key per expert, a learned query projection of
        `rank` dimensions, top-1 softmax, no threshold), kept for the ablation.
    seed: seeds training, planning and the paper router's initial projection.
    expert_dtype: the precision experts are kept and stored in once trained (they train in the model's).
        float16 halves the bytes per fact; on the ZsRE training split it changes no metric by more than
        benchmarks/half_precision.py reports. Stores made before this setting existed keep float32. (The key
        readers' images at the anchors stay float32, as the anchors do: see `adaptor.compact_key_readers`.)
    """

    layer: int | None = None
    rank: int = 64
    key_layer: int | None = None
    threshold: float = 0.8
    subject_threshold: float = 0.6
    scale: float = 1.0
    routing: str = "kv-anchor"
    seed: int = 0
    expert_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {ROUTINGS}, not {self.routing!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise ConfigError(f"expert_dtype must be one of {EXPERT_DTYPES}, not {self.expert_dtype!r}")
        if not (0.0 < self.threshold <= 1.0 and 0.0 < self.subject_threshold <= 1.0):
            raise ConfigError("threshold and subject_threshold must be in (0, 1]")
        if self.rank < 1:
            raise ConfigError("rank must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """Settings as saved by this or an older version (unknown keys, like the old `device`, are dropped)."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        # Settings saved before keys had their own layer took them at the adaptor's layer, and before
        # experts had a storage precision they were float32.
        data.setdefault("key_layer", data.get("layer"))
        data.setdefault("expert_dtype", "float32")
        return cls(**data)

    def adaptor(self) -> AdaptorConfig:
        """Only the adaptor's settings (what an export records)."""
        return AdaptorConfig(**{f.name: getattr(self, f.name) for f in fields(AdaptorConfig)})

    def resolved_layer(self, num_layers: int) -> int:
        layer = round(0.6 * num_layers) if self.layer is None else self.layer
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layer {layer} is outside the model's {num_layers} layers")
        return layer

    def resolved_key_layer(self, num_layers: int) -> int:
        layer = self.resolved_layer(num_layers)
        if self.key_layer is None:
            return min(round(0.2 * num_layers), layer)
        if not 0 <= self.key_layer <= layer:
            raise ConfigError(f"key layer {self.key_layer} must be between 0 and the adaptor's layer {layer}")
        return self.key_layer


@dataclass
class EditConfig(AdaptorConfig):
    """The adaptor's settings plus how each batch is trained and how facts are planned into batches.

    lr, max_steps, loss_floor: each expert trains at `lr` until every answer token is the argmax and the
        loss is under `loss_floor`, for at most `max_steps` steps.
    continuation_tokens: after each trained answer, this many of the base model's own next tokens (its
        greedy continuation of prompt + target) are trained to keep the base model's distribution (KL).
        The gate is closed there, but those positions attend to the answer span the expert pushed on, and
        a strong push leaks into what follows through that attention. Without it, the text after the
        answer is the base model's own far less often (the first token after the answer: 0.52 against
        0.84 of ZsRE train edits; benchmarks/README.md, round 3). One token does as well as three there
        and on every tuning figure, and trains faster.
    context_templates: how many context prefixes (short texts the base model writes) each fact is also
        trained behind, as ROME and WISE do; a copy is trained only where it routes to its own fact.
    anchor_rephrases: train a fact's rephrases too and store their keys as anchors of its expert.
    locality_regulariser: a fact's locality prompts that route to its expert are trained to keep the
        base model's predictions. (Benchmarks turn both off: there rephrases and locality prompts are
        held-out evaluation data.)
    batch_size, plan: facts per expert, and how facts are ordered into batches (see `planning.py`).
    """

    lr: float = 3e-2
    max_steps: int = 40
    loss_floor: float = 0.1
    context_templates: int = 0
    continuation_tokens: int = 1
    anchor_rephrases: bool = True
    locality_regulariser: bool = True
    batch_size: int = 10
    plan: str = "cluster"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.plan not in PLANS:
            raise ConfigError(f"plan must be one of {PLANS}, not {self.plan!r}")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("batch_size and max_steps must be positive")
        if self.context_templates < 0 or self.continuation_tokens < 0:
            raise ConfigError("context_templates and continuation_tokens must not be negative")
