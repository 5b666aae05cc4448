"""Module insertion: the LEMoE adaptor beside one decoder layer's MLP.

    h = MLP(x) + scale * E_r(x)      for the expert r the query is routed to, on the answer span only

Routing happens once per sequence, at prefill, from the prompt's key and tokens (see `routing.py`; the key
is read at the input of an earlier layer's MLP, `key_layer`, recorded by a hook as the prefill passes);
generated tokens reuse that decision, so KV-cache generation routes exactly like a full forward.

The expert acts on the positions it was trained on and nowhere else: from the last prompt token on, for
the matched anchor's span (the number of answer tokens of its fact). Once the answer has been produced the
gate closes and the base model's MLP carries on, so the continuation is the base model's continuation of
the edited text, with no leftover push (an expert left open keeps pushing its answer: "Idaho, Idaho, ...").
Rows routed to no expert get the base MLP output untouched (bit-identical logits), and so do all positions
before the last prompt token, which leaves the prompt's K/V cache identical to the base model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import ModelError
from .config import AdaptorConfig
from .routing import NO_EXPERT, AnchorIndex, IndexCache, PaperRouter, Route, prompt_keys

EXPERT_COMPUTE_DTYPE = torch.float32  # whatever the model's dtype: small experts train poorly in bf16
ROUTER_PREFIX = "router."  # artifact weights of the paper's routing (its expert key, the query projection)
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LAYER_LISTS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers")


class Expert(nn.Module):
    """A small gated FFN (hidden -> rank -> hidden) whose gate also reads a routing key (that of the anchor
    the prompt matched), and whose value reads it too where the answer's first token is predicted (the last
    prompt token); its output projection and its value projection start at zero.

        E(x, k) = down( silu(gate(x) + key(k)) * (up(x) + [first] value(k)) )

    Why the key: an expert holds a batch of similar facts (order planning makes them so), and a rephrase
    routed to the right expert most often failed by answering with a batch-mate's target — the hidden
    state at the answer positions says what kind of question it is, not which fact. The pooled routing
    key is what identifies the fact across rephrasings (that is why it routes well), so the gate sees it —
    and not the query's own key but the key of the anchor it matched: that is the key the fact was trained
    with, so a rephrase that finds its fact's anchor gives the expert exactly its training input there.
    The value reads it for the same reason: with `up(x)` alone the push is a product of the query's own
    hidden state, which a rephrase changes; `value(k)` gives every query routed to a fact the part of the
    push that is the fact's. Only at the first answer position: once the answer has begun, the hidden
    states hold its first tokens and differ little between wordings, while a push that is the same at every
    position kept multi-token answers (dates) from being learnt. On the tuning splits (CounterFact 0-99,
    ZsRE train T = 300), see benchmarks/README.md.
    """

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(hidden, rank, bias=False)
        self.key = nn.Linear(hidden, rank, bias=False)
        self.value = nn.Linear(hidden, rank, bias=False)
        self.down = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.value.weight)  # a new expert starts as one without the key's value

    def forward(self, x: torch.Tensor, keys: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H) MLP inputs; keys: (B, H) unit keys of the anchors the rows' prompts matched;
        first: (B, T) where each row's answer's first token is predicted (its last prompt token)."""
        x = x.to(self.gate.weight.dtype)  # experts compute in float32 on a bf16/fp16 model (as peft's adapters)
        keys = self.scaled(keys.to(x.dtype))[:, None, :]
        value = self.value(keys) * first[..., None].to(x.dtype)
        return self.down(nn.functional.silu(self.gate(x) + self.key(keys)) * (self.up(x) + value))

    @staticmethod
    def scaled(keys: torch.Tensor) -> torch.Tensor:
        """Unit keys -> per-coordinate scale ~1, as the key readers take them."""
        return keys * keys.shape[-1] ** 0.5


# Under anchor routing an expert's key readers (`key`, `value`) only ever read keys of its own anchors: a
# routed row carries the key of the anchor it matched, in training as in inference. All they can produce is
# then their images at those keys (anchors x rank numbers each), and that is what an artifact stores of
# them; a loaded expert gets the smallest projections with those images, which answer as the trained ones
# did (to float32 rounding). Five 64 x 576 projections stored become three, 36.9 -> 22.6 KB per fact at
# batch 10. (The paper's routing passes a query's own key, so its experts keep whole projections.)
KEY_READERS = ("key", "value")
IMAGES = "anchor_images"


def compact_key_readers(weights: dict[str, torch.Tensor], anchors: torch.Tensor) -> dict[str, torch.Tensor]:
    """`weights` with each key reader's projection replaced by its images at the (unit) `anchors`, float32."""
    scaled = Expert.scaled(anchors.detach().cpu().float()).double()
    compact = {k: v for k, v in weights.items() if k not in {f"{r}.weight" for r in KEY_READERS}}
    for reader in KEY_READERS:
        compact[f"{reader}.{IMAGES}"] = (scaled @ weights[f"{reader}.weight"].detach().cpu().double().T).float()
    return compact


def restore_key_readers(weights: dict[str, torch.Tensor], anchors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of `compact_key_readers`: the minimum-norm projections mapping each anchor to its images
    (float32, on the CPU); weights without images are returned as they are."""
    if f"{KEY_READERS[0]}.{IMAGES}" not in weights:
        return weights
    inverse = torch.linalg.pinv(Expert.scaled(anchors.detach().cpu().float()).double())  # (H, anchors)
    restored = {k: v for k, v in weights.items() if not k.endswith(f".{IMAGES}")}
    for reader in KEY_READERS:
        restored[f"{reader}.weight"] = (inverse @ weights[f"{reader}.{IMAGES}"].cpu().double()).T.float().contiguous()
    return restored


@dataclass
class ExpertArtifact:
    """What one edit batch leaves behind: a frozen expert, its anchor keys and the training record.

    `weights` are the expert's tensors by name; under anchor routing its key readers are there as their
    images at the anchors (`key.anchor_images`, `value.anchor_images`; see `compact_key_readers`).

    Per anchor: the fact it stands for, the span its expert acts on (answer tokens) and the subject's token
    sequences its query must contain (empty: none). Artifacts saved before spans and subjects were kept
    have neither (unbounded span, no subject check)."""

    weights: dict[str, torch.Tensor]
    anchors: torch.Tensor
    anchor_facts: list[str]
    stats: dict = field(default_factory=dict)
    anchor_spans: list[int] | None = None
    anchor_subjects: list[list[list[int]]] | None = None

    @property
    def rank(self) -> int:
        return self.weights["gate.weight"].shape[0]


@dataclass
class RoutingDecision:
    experts: torch.Tensor  # (B,) expert index per row, NO_EXPERT for none
    start: torch.Tensor  # (B,) position of the row's last prompt token in the current chunk (may be < 0)
    weights: torch.Tensor | None = None  # (B,) gate per row (a learned router's); None: the expert's full output
    keys: torch.Tensor | None = None  # (B, H) the keys experts read: each row's matched anchor's (kv-anchor)
    span: torch.Tensor | None = None  # (B,) positions from `start` on that the expert acts on; None: all


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, ...)."""
    for dotted in _LAYER_LISTS:
        module: object = model
        for part in dotted.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(lists, key=len)


def mlp_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's MLP module (or the adaptor wrapping it)."""
    return getattr(layer, _mlp_name(layer))


def _mlp_name(layer: nn.Module) -> str:
    for name in _MLP_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise ModelError(f"cannot find the MLP of {type(layer).__name__} (looked for {', '.join(_MLP_NAMES)})")


class KeysRead(Exception):
    """Ends a forward run under `LemoeAdaptor.reading_keys()` once its routing keys are known."""


class LemoeAdaptor(nn.Module):
    """Wraps one MLP; holds the frozen experts, their anchor index and the per-sequence routing."""

    def __init__(self, base: nn.Module, hidden: int, config: AdaptorConfig, layer: int, key_layer: int | None = None) -> None:
        super().__init__()
        self.base = base
        self.hidden = hidden
        self.layer = layer
        self.key_layer = layer if key_layer is None else key_layer
        self.config = config
        self.experts = nn.ModuleList()
        self.anchors = AnchorIndex(hidden, config.threshold, config.subject_threshold)  # blame searches it too
        self.anchor_facts: list[str] = []
        self.paper_router = self._paper_router() if config.routing == "kv-anchor-paper" else None
        self.last_keys: torch.Tensor | None = None
        self.last_routes: list[Route] = []
        self._prefill: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self._decision: RoutingDecision | None = None
        self._forced: RoutingDecision | None = None
        self._prompt_lengths: torch.Tensor | None = None
        self._key_input: torch.Tensor | None = None
        self._bypass = False
        self._reading_keys = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def _paper_router(self) -> PaperRouter:
        router = PaperRouter(self.hidden, self.config.rank)
        generator = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            router.query.weight.copy_(torch.randn(router.query.weight.shape, generator=generator) / self.hidden**0.5)
        return router.to(self.base_parameter().device).requires_grad_(False)

    # -- experts -----------------------------------------------------------------------------------
    def add_expert(self, artifact: ExpertArtifact | None = None, rank: int | None = None) -> int:
        """Append an expert (frozen if loaded from an artifact, trainable if new); return its index."""
        reference = self.base_parameter()
        if artifact is None:
            expert = Expert(self.hidden, rank or self.config.rank).to(reference.device, EXPERT_COMPUTE_DTYPE)
        else:
            with torch.device("meta"):  # the stored weights replace these: no random initialisation to pay
                expert = Expert(self.hidden, artifact.rank)  # (1,000 experts: 2 s of a 10 s checkout)
            weights = restore_key_readers({k: v for k, v in artifact.weights.items()
                                           if not k.startswith(ROUTER_PREFIX)}, artifact.anchors)
            # Experts saved before the gate (or the value) read the key: a zero projection is exactly that expert.
            for name in ("key.weight", "value.weight"):
                weights.setdefault(name, torch.zeros_like(weights["gate.weight"]))
            expert.load_state_dict({k: v.to(reference.device, EXPERT_COMPUTE_DTYPE, copy=True)
                                    for k, v in weights.items()}, assign=True)
            expert.requires_grad_(False)
            self.add_anchors(artifact.anchors, len(self.experts), artifact.anchor_facts,
                             artifact.anchor_spans, artifact.anchor_subjects)
            if self.paper_router is not None:  # the newest artifact carries the projection as it was trained
                self.paper_router.add_key(artifact.weights[f"{ROUTER_PREFIX}key"].to(reference.device, torch.float32))
                with torch.no_grad():
                    self.paper_router.query.weight.copy_(artifact.weights[f"{ROUTER_PREFIX}query"])
        self.experts.append(expert)
        return len(self.experts) - 1

    def add_anchors(self, keys: torch.Tensor, expert: int, facts: list[str], spans: list[int] | None = None,
                    subjects: list[list[list[int]]] | None = None) -> None:
        self.anchors.add(keys, expert, spans, subjects)
        self.anchor_facts.extend(facts)

    def base_parameter(self) -> torch.Tensor:
        return next(self.base.parameters())

    # -- routing state, driven by the model's forward pre-hook ---------------------------------------
    def begin_sequence(self, attention_mask: torch.Tensor, input_ids: torch.Tensor | None) -> None:
        self._prefill = (attention_mask, self._prompt_lengths, input_ids)

    def continue_sequence(self) -> None:
        self._prefill = None

    def record_key_input(self, x: torch.Tensor) -> None:
        """Called with the key layer's MLP input on every forward; kept only at prefill."""
        if self._prefill is not None and not self._bypass:
            self._key_input = x
            if self._reading_keys:
                self._keys_read(x)

    @contextmanager
    def teacher_forcing(self, prompt_lengths: torch.Tensor) -> Iterator[None]:
        """Within: inputs are prompt + answer; route on the first `prompt_lengths[i]` real tokens of row i."""
        self._prompt_lengths = prompt_lengths
        try:
            yield
        finally:
            self._prompt_lengths = None

    @contextmanager
    def reading_keys(self) -> Iterator[None]:
        """Within: a prefill stops, raising `KeysRead`, as soon as its routing keys are in `last_keys`, so
        the layers above the key layer are not run (planning, blame and routing statistics need no more)."""
        self._reading_keys = True
        try:
            yield
        finally:
            self._reading_keys = False

    def _keys_read(self, key_input: torch.Tensor) -> None:
        prompt_mask, _ = self.prompt_layout()
        self.last_keys = prompt_keys(key_input, prompt_mask)
        self._prefill = self._key_input = None
        raise KeysRead

    @contextmanager
    def forced(self, decision: RoutingDecision) -> Iterator[None]:
        """Within: route as `decision` says, bypassing the key lookup (training)."""
        self._forced = decision
        try:
            yield
        finally:
            self._forced = None

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Within: the model is the base model (no key lookup, no expert)."""
        self._bypass = True
        try:
            yield
        finally:
            self._bypass = False

    def prompt_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """At prefill: (B, T) mask of the prompt tokens, and (B,) index of each row's last prompt token."""
        attention_mask, prompt_lengths, _ = self._prefill
        real = attention_mask.to(torch.bool)
        rank_in_row = real.long().cumsum(dim=1) - 1
        lengths = real.sum(dim=1) if prompt_lengths is None else prompt_lengths.to(real.device)
        prompt_mask = real & (rank_in_row < lengths[:, None])
        first_real = real.float().argmax(dim=1).long()
        return prompt_mask, first_real + lengths.long() - 1

    def prompt_tokens(self, prompt_mask: torch.Tensor) -> list[list[int]]:
        """At prefill: each row's prompt token ids (empty when the model was given embeddings, not ids)."""
        input_ids = self._prefill[2]
        if input_ids is None:
            return [[] for _ in range(prompt_mask.shape[0])]
        return [row[mask].tolist() for row, mask in zip(input_ids, prompt_mask.to(input_ids.device))]

    def prefill_keys(self, x: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """At prefill: the prompts' routing keys (B, H), from the key layer's MLP input (this layer's is `x`)."""
        key_input, self._key_input = (x if self.key_layer == self.layer else self._key_input), None
        if key_input is None or key_input.shape[:2] != x.shape[:2]:
            raise RuntimeError(f"no input of key layer {self.key_layer} was recorded for this prefill")
        return prompt_keys(key_input, prompt_mask)

    def _route_prefill(self, x: torch.Tensor) -> RoutingDecision:
        prompt_mask, last_prompt_token = self.prompt_layout()
        self.last_keys = self.prefill_keys(x, prompt_mask)
        if self.paper_router is not None and len(self.paper_router.keys):
            gates, experts = torch.softmax(self.paper_router.logits(self.last_keys), dim=-1).max(dim=-1)
            self.last_routes = [Route(int(e), float(g), -1) for e, g in zip(experts, gates)]
            return RoutingDecision(experts.to(x.device), last_prompt_token, gates.to(x.device), self.last_keys)
        self.last_routes = self.anchors.route(self.last_keys, self.prompt_tokens(prompt_mask))
        experts = torch.tensor([r.expert for r in self.last_routes], device=x.device, dtype=torch.long)
        return RoutingDecision(experts, last_prompt_token, keys=self.anchors.matched_keys(self.last_keys, self.last_routes),
                               span=self.anchors.spans_of(self.last_routes).to(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._reading_keys and self._prefill is not None and not self._bypass:
            self._keys_read(x)  # the keys are read at this layer's own input
        out = self.base(x)
        if self._bypass:
            return out
        if self._forced is not None:
            return self._apply(x, out, self._forced)
        if self._prefill is not None:
            decision = self._route_prefill(x)
            self._prefill = None
        elif self._decision is not None:  # a generation step: its tokens follow the previous chunk's
            decision = self._decision
        else:
            return out
        self._decision = replace(decision, start=decision.start - x.shape[1])
        return self._apply(x, out, decision)

    def _apply(self, x: torch.Tensor, out: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        offset = torch.arange(x.shape[1], device=x.device)[None, :] - decision.start[:, None]
        active = offset >= 0
        if decision.span is not None:
            active &= offset < decision.span[:, None]  # (B, T): the answer span, nothing after
        routed = (decision.experts != NO_EXPERT) & active.any(dim=1)
        if not bool(routed.any()):
            return out
        result = out.clone()
        for expert in torch.unique(decision.experts[routed]).tolist():
            rows = ((decision.experts == expert) & routed).nonzero().squeeze(1)
            active_rows = active[rows].unsqueeze(-1)
            delta = self.config.scale * self.experts[expert](x[rows], decision.keys[rows].to(x.device), offset[rows] == 0)
            if decision.weights is not None:
                delta = delta * decision.weights[rows].to(delta.dtype)[:, None, None]
            delta = delta.to(out.dtype)
            result[rows] = torch.where(active_rows, out[rows] + delta, out[rows])
        return result


def _before_model_forward(adaptor: LemoeAdaptor):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            adaptor.continue_sequence()
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        shape_of = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(shape_of.shape[:2], dtype=torch.long, device=shape_of.device)
        adaptor.begin_sequence(mask, input_ids)

    return hook


def find_adaptor(model: nn.Module) -> LemoeAdaptor | None:
    return next((m for m in model.modules() if isinstance(m, LemoeAdaptor)), None)


def attach(model: nn.Module, experts: list[ExpertArtifact], config: AdaptorConfig, *,
           cache: IndexCache | None = None, version: str | None = None) -> LemoeAdaptor:
    """Insert a LEMoE adaptor (replacing any earlier one) holding exactly `experts`, in order, frozen.

    A history with many anchors is searched through an approximate index, taken from `cache` under the
    name of `version` (its commit) when given and built there once (see `routing.APPROXIMATE_FROM`)."""
    count = len(decoder_layers(model))
    layer_index, key_layer = config.resolved_layer(count), config.resolved_key_layer(count)
    adaptor = insert(model, lambda mlp, hidden: LemoeAdaptor(mlp, hidden, config, layer_index, key_layer), layer_index)
    for artifact in experts:
        adaptor.add_expert(artifact)
    adaptor.anchors.index_approximately(cache, version)
    return adaptor


def reattach(model: nn.Module, adaptor: LemoeAdaptor) -> LemoeAdaptor:
    """Put back an adaptor built by `attach` on this model earlier (replacing any other): switching
    between versions this way costs no loading."""
    return insert(model, lambda _mlp, _hidden: adaptor, adaptor.layer)


def insert(model: nn.Module, make: Callable[[nn.Module, int], LemoeAdaptor], layer_index: int) -> LemoeAdaptor:
    """Wrap layer `layer_index`'s MLP in `make(mlp, hidden)` (an adaptor, or a subclass routing its own way)."""
    detach(model)
    layer = decoder_layers(model)[layer_index]
    name = _mlp_name(layer)
    adaptor = make(getattr(layer, name), model.get_input_embeddings().weight.shape[1])
    setattr(layer, name, adaptor)
    adaptor._hooks.append(model.register_forward_pre_hook(_before_model_forward(adaptor), with_kwargs=True))
    if adaptor.key_layer != layer_index:
        key_mlp = mlp_of(decoder_layers(model)[adaptor.key_layer])
        adaptor._hooks.append(key_mlp.register_forward_pre_hook(lambda _m, args: adaptor.record_key_input(args[0])))
    return adaptor


def detach(model: nn.Module) -> None:
    """Remove the adaptor: the model is the untouched base model again."""
    adaptor = find_adaptor(model)
    if adaptor is None:
        return
    layer = decoder_layers(model)[adaptor.layer]
    setattr(layer, _mlp_name(layer), adaptor.base)
    for hook in adaptor._hooks:
        hook.remove()
    adaptor._hooks.clear()
