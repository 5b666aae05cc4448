"""The Python API: a `Repo` composes the store (history) with the LEMoE engine (training, routing).

    from lemoe_store.repo import Repo
    repo = Repo.init("my-edits")                      # embedded SmolLM2 by default
    repo.commit(load_facts("facts.jsonl"), message="2024 facts")
    repo.ask("The capital of Atlantis is").text
    repo.checkout("HEAD~1")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import audit, models, plumbing
from .audit import AuditRecord
from .editing.config import EditConfig
from .history import HistoryMixin
from .sharing import SharingMixin
from .schemas.facts import Fact, as_facts, find_duplicates_and_conflicts
from .stores import Commit, Store, StoreError
from .stores import index as idx

if TYPE_CHECKING:  # the engine (torch, transformers) loads only when a command needs a model
    import torch

    from .editing import ExpertArtifact, Scores

Progress = plumbing.Progress
ATTACHED_UNKNOWN = "<unknown>"  # the loaded model's experts match no known version: re-attach on next use


@dataclass(frozen=True)
class RouteInfo:
    """How one prompt was routed at a version: which commit's expert answered, or None for the base model."""

    commit: str | None  # the commit that introduced the routed expert; None: base model answered
    expert: int | None  # position of the routed expert in the version's tree
    similarity: float | None
    fact_id: str | None  # the fact whose anchor matched best (or, unrouted, the nearest anchor's)
    threshold: float | None = None  # the threshold that applied; None: that anchor's subject is not in the prompt

    @property
    def routed(self) -> bool:
        return self.expert is not None


UNROUTED = RouteInfo(None, None, None, None)


@dataclass
class Answer:
    prompt: str
    text: str
    rev: str | None  # the version asked
    commit: str | None  # the commit that introduced the routed expert; None: base model answered
    expert: int | None  # position of the routed expert in the version's tree
    similarity: float | None
    fact_id: str | None  # the fact whose anchor matched best (or, unrouted, the nearest anchor's)
    threshold: float | None = None  # the threshold that applied; None: that anchor's subject is not in the prompt

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Status:
    store: str
    model: str
    fingerprint: str
    layer: int
    key_layer: int
    branch: str | None  # None: HEAD is detached
    head: str | None  # None: no commits yet
    experts_active: int
    facts_active: int
    bytes_on_disk: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CommitInfo:
    """One commit as `show` gives it: its id, its manifest, and (for an edit) its facts and object sizes."""

    id: str
    commit: Commit
    facts: list[Fact]
    expert_bytes: int | None
    anchors_bytes: int | None

    def to_dict(self) -> dict:
        data = {"id": self.id, **self.commit.to_dict(), "experts_active": len(self.commit.tree)}
        if self.commit.expert:
            data |= {"facts": [f.to_record() for f in self.facts], "expert_bytes": self.expert_bytes,
                     "anchors_bytes": self.anchors_bytes}
        return data


@dataclass
class CommitPlan:
    batches: list[list[Fact]]
    duplicates: list[Fact] = field(default_factory=list)
    conflicts: list = field(default_factory=list)
    overwrites: list[str] = field(default_factory=list)  # prompts already edited in the history
    settings: dict = field(default_factory=dict)  # the planner settings used (recorded in each commit)


class Repo(HistoryMixin, SharingMixin):
    def __init__(self, store: Store, device: str = "auto") -> None:
        self.store = store
        self.device = device
        self._model = None
        self._tokenizer = None
        self._attached: str | None = ATTACHED_UNKNOWN  # the version whose experts are attached

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: str | Path = ".",
        *,
        model: str = models.DEFAULT_MODEL,
        layer: int | None = None,
        progress: Callable[[str], None] | None = None,
        **edit: object,
    ) -> Repo:
        from .editing.adaptor import decoder_layers

        source = models.resolve_model(model, progress)
        base, _ = models.load_model(model, device="cpu")
        layers = len(decoder_layers(base))
        config = EditConfig(layer=layer, **edit)
        config.layer, config.key_layer = config.resolved_layer(layers), config.resolved_key_layer(layers)
        base_model = {
            "id": source.model_id,
            "fingerprint": models.fingerprint(source.path),
            "layers": layers,
            "hidden": base.get_input_embeddings().weight.shape[1],
        }
        return cls(Store.init(Path(path), base_model, config.to_dict()))

    @classmethod
    def open(cls, path: str | Path | None = None, *, device: str = "auto") -> Repo:
        return cls(Store.find(path), device)

    @property
    def config(self) -> EditConfig:
        return EditConfig.from_dict(self.store.config["edit"])

    def base_model(self, progress: Callable[[str], None] | None = None):
        """(model, tokenizer) of the store's base model, loaded once and checked against its fingerprint."""
        if self._model is None:
            recorded = self.store.config["base_model"]
            source = models.resolve_model(recorded["id"], progress)
            found = models.fingerprint(source.path)
            if found != recorded["fingerprint"]:
                raise StoreError(
                    f"base model {recorded['id']} has fingerprint {found[:12]}, but this store was made with "
                    f"{recorded['fingerprint'][:12]}: refusing to mix models"
                )
            self._model, self._tokenizer = models.load_model(recorded["id"], device=self.device)
        return self._model, self._tokenizer

    # -- versions ----------------------------------------------------------------------------------------
    def experts_at(self, cid: str | None) -> list[ExpertArtifact]:
        if cid is None:
            return []
        return [plumbing.read_artifact(self.store, entry) for entry in self.store.read_commit(cid).tree]

    def model_at(self, rev: str | None = None):
        """(model, tokenizer): a new, independent base model with exactly `rev`'s experts attached (HEAD by
        default). Two calls give two models; `old, _ = repo.model_at("v1")` stays at v1."""
        from .export import load_version

        return load_version(self, rev, device=self.device)

    def attach_experts(self, model, cid: str | None):
        """Attach exactly commit `cid`'s experts to `model` (this store's base model); return the adaptor.
        A large history's approximate anchor index is built once and kept in the store's cache/."""
        from .editing import attach

        return attach(model, self.experts_at(cid), self.config, cache=self.store, version=cid)

    def _shared_model_at(self, rev: str | None):
        """The repo's one loaded model, switched to `rev`'s experts (what ask, eval, blame and diff reuse)."""
        cid = self._resolve_or_none(rev)
        model, tokenizer = self.base_model()
        if self._attached != cid:
            self.attach_experts(model, cid)
            self._attached = cid
        return model, tokenizer

    def _resolve_or_none(self, rev: str | None) -> str | None:
        if rev is None:
            return self.store.head()[1]
        return self.store.resolve(rev)

    def resolve(self, rev: str) -> str:
        """The commit id `rev` names (HEAD, a branch, a tag, a unique short id, with ~N / ^)."""
        return self.store.resolve(rev)

    def head(self) -> tuple[str | None, str | None]:
        """(branch HEAD is on, or None when detached; its commit, or None before the first commit)."""
        return self.store.head()

    def branches(self) -> dict[str, str]:
        return self.store.branches()

    def tags(self) -> dict[str, str]:
        return self.store.tags()

    def refs(self) -> dict[str, str]:
        """Every branch and tag by full name (refs/heads/..., refs/tags/...)."""
        return self.store.all_refs()

    def get_commit(self, rev: str) -> Commit:
        """The manifest of the commit `rev` names."""
        return self.store.read_commit(self.resolve(rev))

    @property
    def base_model_id(self) -> str:
        return self.store.config["base_model"]["id"]

    @property
    def path(self) -> Path:
        """The store's directory (.lemoe)."""
        return self.store.root

    def facts_at(self, rev: str | None = None) -> list[Fact]:
        """Every fact of a version, in edit order; a later edit of the same prompt replaces the earlier."""
        cid = self._resolve_or_none(rev)
        if cid is None:
            return []
        by_prompt: dict[str, Fact] = {}
        for entry in self.store.read_commit(cid).tree:
            for record in self.store.read_facts(entry.facts):
                by_prompt.pop(record["prompt"], None)
                by_prompt[record["prompt"]] = Fact.from_record(record)
        return list(by_prompt.values())

    # -- writing history -------------------------------------------------------------------------------------
    def plan_commit(self, facts: Iterable[Fact | dict], *, batch_size: int | None = None, plan: str | None = None,
                    seed: int | None = None) -> CommitPlan:
        """Validate facts (Fact objects or plain dicts) against the history and split them into batches (one
        expert each)."""
        from .editing import plan as plan_batches
        from .editing.batching import routing_keys

        facts = as_facts(facts)
        if not facts:
            raise StoreError("nothing to commit: no facts given")
        config = self.config
        duplicates, conflicts = find_duplicates_and_conflicts(facts)
        if conflicts:
            first = conflicts[0]
            raise StoreError(
                f"{len(conflicts)} conflicting fact(s) in the input, e.g. {first.prompt!r} -> "
                f"{' / '.join(map(repr, first.targets))}; keep one target per prompt"
            )
        dup_ids = {id(f) for f in duplicates}
        unique = [f for f in facts if id(f) not in dup_ids]
        known = {f.prompt: f.target for f in self.facts_at()}
        overwrites = [f.prompt for f in unique if f.prompt in known and known[f.prompt] != f.target]
        model, tokenizer = self._shared_model_at(None)
        keys = routing_keys(model, tokenizer, [f.prompt for f in unique])
        settings = {"order": plan or config.plan, "batch_size": batch_size or config.batch_size,
                    "seed": config.seed if seed is None else seed}
        batches = plan_batches(keys, settings["batch_size"], settings["order"], settings["seed"],
                       groups=[f.subject or None for f in unique])
        settings["batches"] = len(batches)
        return CommitPlan([[unique[i] for i in b] for b in batches], duplicates, conflicts, overwrites, settings)

    def commit(
        self,
        facts: Iterable[Fact | dict],
        *,
        message: str = "",
        batch_size: int | None = None,
        plan: str | None = None,
        seed: int | None = None,
        progress: Progress | None = None,
        on_wait: Callable[[str], None] | None = None,
        on_plan: Callable[[CommitPlan], None] | None = None,
        workers: int = 1,
        ray: str | None = None,
    ) -> list[str]:
        """Plan, train one frozen expert per batch and write one commit per batch; return the commit ids.

        Each batch's commit becomes HEAD as soon as it is written, so an interruption keeps every
        finished batch and nothing half-done. `workers` > 1 trains the batches at once in that many local
        processes; `ray` does it on a Ray cluster ("" or "local": one started here; else its address).
        The commits are the same as in turn (weights equal within float tolerance).
        """
        from .parallel import workers_for  # multiprocessing: only for a commit

        pool = workers_for(workers, ray)
        with self.store.lock(on_wait=on_wait):
            planned = self.plan_commit(facts, batch_size=batch_size, plan=plan, seed=seed)
            if on_plan:
                on_plan(planned)
            head = self.store.head()[1]

            def advance(cid: str, parent: str | None, commit: Commit) -> None:
                self.store.advance_head(cid, parent, f"commit: {commit.subject}")

            return self._train(planned.batches, head, message=message or "edit", kind="edit",
                               planner=planned.settings, seed=seed, progress=progress, on_commit=advance,
                               workers=pool)

    def _train(self, batches: list[list[Fact]], parent: str | None, *, message: str, kind: str, planner: dict,
               seed: int | None, progress: Progress | None, on_commit: plumbing.OnCommit,
               workers: plumbing.Workers | None = None) -> list[str]:
        """Train one expert per batch on top of `parent` (the shared model's experts change meanwhile)."""
        config = self.config
        config.seed = config.seed if seed is None else seed
        model, tokenizer = self.base_model()
        self._attached = ATTACHED_UNKNOWN
        created = plumbing.train_batches(self.store, model, tokenizer, config, batches, parent=parent,
                                         parent_facts=self.facts_at(parent) if parent else [], message=message,
                                         kind=kind, planner=planner, progress=progress, on_commit=on_commit,
                                         workers=workers, device=str(models.resolve_device(self.device)))
        self._attached = created[-1]
        return created

    def checkout(self, rev: str, *, new_branch: str | None = None) -> str:
        """Move HEAD (to a branch, or detached to a commit); with new_branch, create it at rev first."""
        cid = self.store.resolve(rev)
        if new_branch:
            self.store.create_branch(new_branch, cid)
            self.store.checkout(new_branch, f"checkout: new branch {new_branch} at {rev}")
        elif rev in self.store.branches():
            self.store.checkout(rev, f"checkout: moving to {rev}")
        else:
            self.store.checkout(cid, f"checkout: moving to {rev}")
        return cid

    # -- reading -------------------------------------------------------------------------------------------
    def log(self, rev: str | None = None, *, limit: int | None = None, grep: str | None = None) -> list[tuple[str, Commit]]:
        cid = self._resolve_or_none(rev)
        if cid is None:
            return []
        hits = idx.search_commits(self.store.db, grep) if grep else None
        out = []
        for commit_id, commit in self.store.walk(cid):
            if hits is None or commit_id in hits:
                out.append((commit_id, commit))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def introducing_commit(self, expert_id: str) -> str | None:
        found = idx.commits_introducing(self.store.db, expert_id)
        return found[0] if found else None

    def ask(self, prompt: str, *, rev: str | None = None, max_new_tokens: int = 16) -> Answer:
        """Greedy answer at a version, with the routing decision that produced it."""
        import torch

        from .editing.batching import encode_prompt, model_device

        cid = self._resolve_or_none(rev)
        model, tokenizer = self._shared_model_at(cid)
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model_device(model))
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
        route = self.last_route(model, cid)
        return Answer(prompt, text, cid, route.commit, route.expert, route.similarity, route.fact_id, route.threshold)

    def last_route(self, model: torch.nn.Module, cid: str | None) -> RouteInfo:
        """How the last prompt `model` ran (its first row) was routed, with `cid`'s experts attached."""
        from .editing import find_adaptor
        from .editing.routing import NO_EXPERT

        adaptor = find_adaptor(model)
        if adaptor is None or not adaptor.last_routes:
            return UNROUTED
        route = adaptor.last_routes[0]
        if route.anchor < 0:
            return UNROUTED
        fact_id = adaptor.anchor_facts[route.anchor]
        if route.expert == NO_EXPERT:
            return RouteInfo(None, None, route.similarity, fact_id, route.threshold)
        entry = self.store.read_commit(cid).tree[route.expert]
        return RouteInfo(self.introducing_commit(entry.expert), route.expert, route.similarity, fact_id,
                         route.threshold)

    def evaluate(self, facts: list[Fact] | None = None, *, rev: str | None = None, generate: bool = False) -> Scores:
        """Teacher-forced Rel/Gen/Loc at a version; with `generate`, the free-generation metrics too."""
        cid = self._resolve_or_none(rev)
        facts = self.facts_at(cid) if facts is None else facts
        if not facts:
            raise StoreError("no facts to evaluate at this version")
        from .editing import evaluate

        model, tokenizer = self._shared_model_at(cid)
        return evaluate(model, tokenizer, facts, generate=generate)

    # -- the audit trail of served answers ----------------------------------------------------------------
    def audit(self, *, commit: str | None = None, fact_id: str | None = None, since: datetime | None = None,
              limit: int | None = None) -> list[AuditRecord]:
        """Answers `lemoe serve` gave, oldest first; `commit` is a revision whose expert answered, or "base"."""
        routed = commit if commit in (None, audit.BASE) else self.resolve(commit)
        return audit.read_audit(self.store.root, commit=routed, fact_id=fact_id, since=since, limit=limit)

    def served_answers(self, rev: str) -> int:
        """How many served answers the expert introduced by `rev` gave."""
        return audit.count_served(self.store.root, self.resolve(rev))

    def audit_writer(self) -> audit.AuditWriter:
        return audit.AuditWriter(self.store.root)

    def status(self) -> Status:
        branch, cid = self.store.head()
        tree = self.store.read_commit(cid).tree if cid else []
        return Status(
            store=str(self.store.root),
            model=self.base_model_id,
            fingerprint=self.store.config["base_model"]["fingerprint"],
            layer=self.config.layer,
            key_layer=self.config.key_layer,
            branch=branch,
            head=cid,
            experts_active=len(tree),
            facts_active=len(self.facts_at(cid)) if cid else 0,
            bytes_on_disk=self.store.size_on_disk(),
        )

    def show(self, rev: str = "HEAD") -> CommitInfo:
        cid = self.store.resolve(rev)
        commit = self.store.read_commit(cid)
        if commit.expert is None:
            return CommitInfo(cid, commit, [], None, None)
        facts = [Fact.from_record(r) for r in self.store.read_facts(commit.expert.facts)]
        return CommitInfo(cid, commit, facts, self.store.objects.size(commit.expert.expert),
                          self.store.objects.size(commit.expert.anchors))

