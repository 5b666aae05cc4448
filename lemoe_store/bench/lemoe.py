"""LEMoE itself in the benchmark: the engine's `Editor`, one frozen expert per batch, routed by per-fact
anchors with (`lemoe-anchors`, ours) or without (`lemoe-anchors-no-plan`) clustering-based order planning,
or by the paper's own KV anchor routing (`lemoe-paper`: one learned key per expert, a learned query
projection, top-1)."""

from __future__ import annotations

from ..editing import EditConfig, Editor, plan
from ..plumbing import artifact_to_blobs
from ..schemas.facts import Fact
from .base import BenchSettings, Method


class Lemoe(Method):
    name = "lemoe-anchors"
    plans_order = True
    planner = "cluster"
    routing = "kv-anchor"

    def __init__(self, model, tokenizer, settings: BenchSettings) -> None:
        super().__init__(model, tokenizer, settings)
        self.config = self.config_for(settings)
        self.editor = Editor(model, tokenizer, self.config)

    @classmethod
    def config_for(cls, settings: BenchSettings) -> EditConfig:
        # Rephrases and locality prompts are held-out evaluation data here: never trained, never anchors.
        return EditConfig(layer=settings.layer, max_steps=settings.max_steps, loss_floor=settings.loss_floor,
                          seed=settings.seed, plan=cls.planner, routing=cls.routing, anchor_rephrases=False,
                          locality_regulariser=False)

    @classmethod
    def hyperparameters(cls, settings: BenchSettings) -> dict:
        return cls.config_for(settings).to_dict()

    def order(self, facts: list[Fact], batch_size: int) -> list[list[Fact]]:
        keys = self.editor.keys([f.prompt for f in facts])
        batches = plan(keys, batch_size, self.config.plan, self.config.seed,
                       groups=[f.subject or None for f in facts])
        return [[facts[i] for i in batch] for batch in batches]

    def edit(self, batch: list[Fact]) -> None:
        artifact = self.editor.edit(batch)
        self.bytes_added += sum(len(blob) for blob in artifact_to_blobs(artifact))


class LemoeNoPlan(Lemoe):
    """Ablation: the facts are edited in their given order (no clustering)."""

    name = "lemoe-anchors-no-plan"
    plans_order = False
    planner = "original"


class LemoePaperRouting(Lemoe):
    """Ablation: the LEMoE paper's KV anchor routing instead of ours (per-fact anchors and a threshold)."""

    name = "lemoe-paper"
    routing = "kv-anchor-paper"
