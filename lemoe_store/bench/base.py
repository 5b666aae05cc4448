"""The interface every editor in the benchmark implements, and the training loop the peers share.

An editor edits one batch of facts at a time (`edit`), in the order given; `model_for_eval()` is the model
as it now answers, scored by `lemoe_store.editing.evaluate` like LEMoE itself. Peers keep the base model
intact where they can (an adaptor beside the MLP, bypassable); FT-L changes the weight itself and puts
it back in `close()`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ..editing import EditConfig, LemoeAdaptor, detach, find_adaptor
from ..editing.adaptor import decoder_layers
from ..editing.editor import lower_layers_replayed, recording_input
from ..editing.batching import Pair, encode_pair, left_pad, positions
from ..editing.wild import greedy_texts
from ..schemas.facts import Fact


_DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")


def down_projection(mlp: nn.Module) -> nn.Module:
    """The MLP's output projection (intermediate -> hidden) for the usual HF layouts."""
    for name in _DOWN_PROJECTIONS:
        if isinstance(getattr(mlp, name, None), nn.Module):
            return getattr(mlp, name)
    raise ValueError(f"no output projection ({', '.join(_DOWN_PROJECTIONS)}) in {type(mlp).__name__}")


class ProjectionInputAdaptor(LemoeAdaptor):
    """An adaptor that also sees `a`, the input of its MLP's output projection (WISE's and MEMOIR's memories
    act on it), through a hook on that projection. The hook joins the adaptor's own, so `detach` (a method's
    `close`) removes it with them; an adaptor of this kind is never re-attached."""

    def __init__(self, base: nn.Module, hidden: int, config: EditConfig, layer: int) -> None:
        super().__init__(base, hidden, config, layer)
        self.projection = down_projection(base)
        self._activation: torch.Tensor | None = None
        self._hooks.append(self.projection.register_forward_hook(self._record_activation))

    def _record_activation(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._activation = args[0]


# EasyEdit's context templates for WISE and MEMOIR (`get_context_templates`, length_params [[5, 5], [10, 5]]):
# the model's own greedy continuations of five starts, 5 and then 10 tokens long.
TEMPLATE_STARTS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)


def reference_templates(model: nn.Module, tokenizer) -> list[str]:
    """The prefixes each edit is trained behind: "" (the bare prompt) and the ten texts the base model writes
    from `TEMPLATE_STARTS`, each followed by a space, as the reference's "<text> {}". Call it before any
    memory is attached: the texts are the unedited model's."""
    prefixes = [""]
    for length in TEMPLATE_LENGTHS:
        texts = greedy_texts(model, tokenizer, list(TEMPLATE_STARTS), length, stopped=False)
        prefixes += [f"{start}{text} " for start, text in zip(TEMPLATE_STARTS, texts)]
    return prefixes


class PlateauStop:
    """The reference's early stop for WISE and MEMOIR (EasyEdit's `EarlyStopMeter`): the loss moved by at
    most 1e-4 since the last step and is at most 0.02."""

    def __init__(self) -> None:
        self.previous = float("inf")

    def __call__(self, loss: float) -> bool:
        done = abs(loss - self.previous) <= 1e-4 and loss <= 0.02
        self.previous = loss
        return done


@dataclass
class BenchSettings:
    """What every method shares: the edited layer, the step budget and the early-stop floor."""

    layer: int = 18
    max_steps: int = 40
    loss_floor: float = 0.1
    seed: int = 0


class Method:
    """One editor under test. Subclasses set `name` and implement `edit`."""

    name = "?"
    plans_order = False  # True: the benchmark lets the method re-order the T facts (LEMoE's planning)
    resumable = False  # True: `state` / `load_state` let a long cell stop and go on from a checkpoint
    own_settings: ClassVar[dict] = {}  # the method's own hyper-parameters (its paper's, scaled to this model)

    @classmethod
    def hyperparameters(cls, settings: BenchSettings) -> dict:
        """Every setting this method's rows run with, as results.json records them."""
        return {**asdict(settings), **cls.own_settings}

    def __init__(self, model: nn.Module, tokenizer, settings: BenchSettings) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.bytes_added = 0  # bytes of state the edits so far added (what a store would keep)

    def order(self, facts: list[Fact], batch_size: int) -> list[list[Fact]]:
        """The edit batches, in order: consecutive slices unless the method plans its own order."""
        return [facts[i : i + batch_size] for i in range(0, len(facts), batch_size)]

    def edit(self, batch: list[Fact]) -> None:
        raise NotImplementedError

    def model_for_eval(self) -> nn.Module:
        return self.model

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What the edits so far wrote (tensors, and JSON values), for a resumable method's checkpoint."""
        raise NotImplementedError(f"{self.name} cannot be checkpointed")

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        """Go on from `state()`'s output, taken on a fresh instance with the same settings."""
        raise NotImplementedError(f"{self.name} cannot be checkpointed")

    def close(self) -> None:
        """Leave the shared model as it was before this method ran."""
        detach(self.model)


@dataclass
class TrainingBatch:
    """Prompt + answer rows, left-padded, with the answer positions' labels (for teacher forcing)."""

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_lengths: torch.Tensor
    labels: torch.Tensor  # (B, T-1): the token each position must predict, -100 where none

    @classmethod
    def build(cls, tokenizer, pairs: list[Pair], device: torch.device) -> TrainingBatch:
        ids, mask = left_pad([p.prompt + p.answer for p in pairs], tokenizer.pad_token_id, device)
        labels = torch.full((len(pairs), ids.shape[1] - 1), -100, dtype=torch.long, device=device)
        for row, pair in enumerate(pairs):
            labels[row, ids.shape[1] - 1 - len(pair.answer) :] = ids[row, ids.shape[1] - len(pair.answer) :]
        lengths = torch.tensor([len(p.prompt) for p in pairs], device=device)
        return cls(ids, mask, lengths, labels)

    @classmethod
    def of_facts(cls, tokenizer, facts: list[Fact], device: torch.device) -> TrainingBatch:
        return cls.build(tokenizer, [encode_pair(tokenizer, f.prompt, f.target) for f in facts], device)


def train_answers(
    model: nn.Module,
    batch: TrainingBatch,
    parameters: list[torch.Tensor],
    settings: BenchSettings,
    *,
    lr: float,
    optimizer: str = "adam",
    extra_loss: Callable[[], torch.Tensor] | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    rows: int | None = None,
    stop_when: Callable[[float], bool] | None = None,
) -> int:
    """Minimise the answers' NLL (+ `extra_loss`) over `parameters`, which act at decoder layer
    `settings.layer` or above, for at most `settings.max_steps`; stop once every answer token is the argmax
    and the loss is under `settings.loss_floor` (or, given `stop_when`, once it says so of the loss). Only the
    first `rows` rows carry answers to learn (others may be in the batch for `extra_loss`). Returns the steps
    taken."""
    adaptor = find_adaptor(model)
    make = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = make(parameters, lr=lr)
    labels = batch.labels[:rows] if rows is not None else batch.labels
    # Rows are left-padded, so every answer sits in the last columns: project only those onto the vocabulary.
    keep = int((labels != -100).sum(dim=1).max()) + 1
    labels = labels[:, -(keep - 1) :]
    counted = labels != -100
    inputs = dict(input_ids=batch.ids, attention_mask=batch.mask, position_ids=positions(batch.mask), use_cache=False)
    # Nothing changes below the edited layer: compute its input once, then each step runs only the layers above.
    recorded: list[torch.Tensor] = []
    with torch.no_grad(), recording_input(decoder_layers(model)[settings.layer], recorded):
        model(**inputs, logits_to_keep=1)
    for step in range(settings.max_steps):
        routing = adaptor.teacher_forcing(batch.prompt_lengths) if adaptor is not None else nullcontext()
        with routing, lower_layers_replayed(model, settings.layer, recorded[0]):
            logits = model(**inputs, logits_to_keep=keep).logits
        logits = logits[: labels.shape[0], :-1][counted]
        loss = nn.functional.cross_entropy(logits, labels[counted])
        if extra_loss is not None:
            loss = loss + extra_loss()
        if stop_when is not None:
            if stop_when(float(loss.detach())):
                return step
        elif bool((logits.argmax(-1) == labels[counted]).all()) and float(loss.detach()) < settings.loss_floor:
            return step
        opt.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        if after_step is not None:
            after_step()
    return settings.max_steps
