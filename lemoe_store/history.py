"""History operations on a Repo: diff, revert, replay under another ordering, blame, branches, tags.

Mixed into `lemoe_store.repo.Repo`; every operation here composes the store and the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import plumbing
from .schemas.facts import Fact
from .stores import StoreError, TreeEntry
from .stores.refs import HEADS, TAGS, check_ref_name


@dataclass
class FactChange:
    prompt: str
    before: str | None  # target at A (None: absent)
    after: str | None  # target at B (None: absent)


@dataclass
class BehaviorChange:
    prompt: str
    kind: str  # edit | rephrase | locality
    answer_a: str
    answer_b: str


@dataclass
class Diff:
    rev_a: str | None
    rev_b: str | None
    added: list[FactChange] = field(default_factory=list)
    removed: list[FactChange] = field(default_factory=list)
    overwritten: list[FactChange] = field(default_factory=list)
    experts_added: list[str] = field(default_factory=list)
    experts_removed: list[str] = field(default_factory=list)
    bytes_delta: int = 0
    behavior: list[BehaviorChange] | None = None


@dataclass
class AnchorMatch:
    commit: str | None
    expert: int
    fact_id: str
    prompt: str | None
    similarity: float


@dataclass
class Blame:
    query: str
    rev: str | None
    threshold: float | None  # the threshold that applied to the routed (or nearest) anchor; None: subject absent
    routed_commit: str | None
    routed_expert: int | None
    matches: list[AnchorMatch]
    answer: str
    answer_without_expert: str | None


@dataclass
class FactBlame:
    fact_id: str
    prompt: str
    target: str
    introduced_by: str
    last_changed_by: str
    active: bool


@dataclass
class ReplayRow:
    label: str
    plan: str
    batches: int
    rel: float
    gen: float | None
    loc: float | None
    seconds: float


class HistoryMixin:
    # -- branches and tags ----------------------------------------------------------------------------
    def branch(self, name: str, *, rev: str = "HEAD") -> str:
        cid = self.store.resolve(rev)
        self.store.create_branch(name, cid)
        return cid

    def delete_branch(self, name: str) -> str:
        if self.store.head()[0] == name:
            raise StoreError(f"cannot delete the branch {name!r}: HEAD is on it")
        return self.store.delete_ref(HEADS, name)

    def tag(self, name: str, *, rev: str = "HEAD") -> str:
        cid = self.store.resolve(rev)
        self.store.create_ref(TAGS, name, cid, f"tag: {name}")
        return cid

    def delete_tag(self, name: str) -> str:
        return self.store.delete_ref(TAGS, name)

    # -- diff -------------------------------------------------------------------------------------------
    def _tree(self, cid: str | None) -> list[TreeEntry]:
        return list(self.store.read_commit(cid).tree) if cid else []

    def _tree_bytes(self, tree: list[TreeEntry]) -> int:
        return sum(self.store.objects.size(e.expert) + self.store.objects.size(e.anchors) for e in tree)

    def diff(self, rev_a: str, rev_b: str, *, behavior: bool = False, max_new_tokens: int = 8) -> Diff:
        a, b = self.store.resolve(rev_a), self.store.resolve(rev_b)
        facts_a = {f.prompt: f for f in self.facts_at(a)}
        facts_b = {f.prompt: f for f in self.facts_at(b)}
        result = Diff(a, b)
        for prompt, fact in facts_b.items():
            if prompt not in facts_a:
                result.added.append(FactChange(prompt, None, fact.target))
            elif facts_a[prompt].target != fact.target:
                result.overwritten.append(FactChange(prompt, facts_a[prompt].target, fact.target))
        result.removed = [FactChange(p, f.target, None) for p, f in facts_a.items() if p not in facts_b]
        tree_a, tree_b = self._tree(a), self._tree(b)
        experts_a, experts_b = {e.expert for e in tree_a}, {e.expert for e in tree_b}
        result.experts_added = [e.expert for e in tree_b if e.expert not in experts_a]
        result.experts_removed = [e.expert for e in tree_a if e.expert not in experts_b]
        result.bytes_delta = self._tree_bytes(tree_b) - self._tree_bytes(tree_a)
        if behavior:
            affected = [facts_b.get(c.prompt) or facts_a[c.prompt]
                        for c in result.added + result.removed + result.overwritten]
            result.behavior = self._behavior_changes(a, b, affected, max_new_tokens)
        return result

    def _behavior_changes(self, a: str, b: str, facts: list[Fact], max_new_tokens: int) -> list[BehaviorChange]:
        prompts = [(f.prompt, "edit") for f in facts]
        prompts += [(r, "rephrase") for f in facts for r in f.rephrases]
        prompts += [(loc.prompt, "locality") for f in facts for loc in f.locality]
        prompts = list(dict.fromkeys(prompts))
        answers_a = [self.ask(p, rev=a, max_new_tokens=max_new_tokens).text for p, _ in prompts]
        answers_b = [self.ask(p, rev=b, max_new_tokens=max_new_tokens).text for p, _ in prompts]
        return [BehaviorChange(p, kind, x, y) for (p, kind), x, y in zip(prompts, answers_a, answers_b) if x != y]

    # -- revert -----------------------------------------------------------------------------------------
    def revert(self, rev: str, *, message: str | None = None) -> str:
        """A new commit whose tree drops `rev`'s expert (or, for a revert, restores what it dropped)."""
        with self.store.lock():
            target = self.store.resolve(rev)
            commit = self.store.read_commit(target)
            head = self.store.head()[1]
            tree = self._tree(head)
            if commit.kind == "revert":
                restored = self._reverted_entry(commit)
                if restored.expert in {e.expert for e in tree}:
                    raise StoreError(f"the expert reverted by {target[:12]} is already active")
                position = self._original_position(commit.reverts, restored, tree)
                tree.insert(position, restored)
            else:
                if commit.expert is None or commit.expert.expert not in {e.expert for e in tree}:
                    raise StoreError(f"nothing to revert: the expert of {target[:12]} is not active at HEAD")
                tree = [e for e in tree if e.expert != commit.expert.expert]
            subject = message or f'Revert "{commit.subject}"'
            new = plumbing.new_commit(self.store, self.config, kind="revert", parent=head,
                                      message=f"{subject}\n\nThis reverts commit {target}.", tree=tree, entry=None,
                                      planner={}, metrics={"facts": 0}, reverts=target)
            return self.store.add_commit(new, head)

    def _reverted_entry(self, revert_commit) -> TreeEntry:
        original = self.store.read_commit(revert_commit.reverts)
        if original.kind == "revert":
            raise StoreError("reverting a revert of a revert: revert the original commit instead")
        return original.expert

    def _original_position(self, original_cid: str, entry: TreeEntry, tree: list[TreeEntry]) -> int:
        """Where the restored expert goes: after the experts that preceded it when it was committed."""
        introduced = self.store.read_commit(original_cid).tree
        before = {e.expert for e in introduced[: [e.expert for e in introduced].index(entry.expert)]}
        positions = [i + 1 for i, e in enumerate(tree) if e.expert in before]
        return max(positions, default=0)

    # -- replay -----------------------------------------------------------------------------------------
    def replay(self, branch: str, *, plan: str = "cluster", seed: int | None = None, batch_size: int | None = None,
               since: str | None = None, progress=None, workers: int = 1,
               ray: str | None = None) -> tuple[list[str], list[ReplayRow]]:
        """Re-plan the history's facts under `plan` and retrain them on a new branch; HEAD stays put.
        `workers`/`ray` train the batches at once, as in `commit`."""
        from .parallel import workers_for

        check_ref_name(branch)
        pool = workers_for(workers, ray)
        if branch in self.store.branches():
            raise StoreError(f"branch {branch!r} already exists")
        with self.store.lock():
            head = self.store.head()[1]
            if head is None:
                raise StoreError("nothing to replay: no commits yet")
            base = self.store.resolve(since) if since else None
            base_prompts = {f.prompt for f in self.facts_at(base)} if base else set()
            facts = [f for f in self.facts_at(head) if f.prompt not in base_prompts]
            if not facts:
                raise StoreError("nothing to replay: no facts after that revision")
            from .editing import plan as plan_batches
            from .editing.batching import routing_keys

            config = self.config
            size = batch_size or config.batch_size
            seed = config.seed if seed is None else seed
            model, tokenizer = self._shared_model_at(base)
            keys = routing_keys(model, tokenizer, [f.prompt for f in facts])
            groups = [f.subject or None for f in facts]
            batches = [[facts[i] for i in b] for b in plan_batches(keys, size, plan, seed, groups)]
            began = time.perf_counter()
            settings = {"order": plan, "batch_size": size, "seed": seed, "batches": len(batches)}
            created = self._train(batches, base, message=f"replay ({plan})", kind="replay", planner=settings,
                                  seed=seed, progress=progress, on_commit=lambda *_: None, workers=pool)
            seconds = time.perf_counter() - began
            self.store.create_branch(branch, created[-1])
        source_scores = self.evaluate(facts, rev=head)
        replay_scores = self.evaluate(facts, rev=created[-1])
        source = [commit for _, commit in self.log(head)]
        source_seconds = sum(c.metrics.get("seconds", 0.0) for c in source if c.kind != "revert")
        source_batches = sum(1 for c in source if c.expert is not None)
        rows = [
            ReplayRow("source", "as committed", source_batches, source_scores.rel, source_scores.gen,
                      source_scores.loc, round(source_seconds, 2)),
            ReplayRow(branch, plan, len(batches), replay_scores.rel, replay_scores.gen, replay_scores.loc,
                      round(seconds, 2)),
        ]
        return created, rows

    # -- blame ------------------------------------------------------------------------------------------
    def blame(self, query: str, *, rev: str | None = None, top_k: int = 5, max_new_tokens: int = 16) -> Blame:
        """Which commit's expert answers `query`, its nearest anchors, and the answer with and without it."""
        import torch

        from .editing import find_adaptor
        from .editing.batching import encode_prompt, model_device, routing_keys

        answer = self.ask(query, rev=rev, max_new_tokens=max_new_tokens)  # the same routing path as `ask`, by construction
        cid = answer.rev
        model, tokenizer = self._shared_model_at(cid)
        tree = self._tree(cid)
        matches: list[AnchorMatch] = []
        adaptor = find_adaptor(model)
        if adaptor is not None and len(adaptor.anchors):
            sims, rows = adaptor.anchors.search(routing_keys(model, tokenizer, [query]), top_k)
            prompts = {f.id: f.prompt for f in self.facts_at(cid)} if cid else {}
            for sim, row in zip(sims[0], rows[0]):
                if row < 0:
                    continue
                expert = int(adaptor.anchors.experts[row])
                fact_id = adaptor.anchor_facts[row]
                matches.append(AnchorMatch(self.introducing_commit(tree[expert].expert), expert, fact_id,
                                           prompts.get(fact_id), float(sim)))
        without = None
        if answer.expert is not None:
            ids = torch.tensor([encode_prompt(tokenizer, query)], device=model_device(model))
            with adaptor.bypassed():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            without = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return Blame(query, cid, answer.threshold, answer.commit, answer.expert, matches, answer.text, without)

    def blame_fact(self, prompt_or_id: str, *, rev: str | None = None) -> FactBlame:
        """The commit that introduced a fact (by prompt or id) and the one that last changed its target."""
        cid = self._resolve_or_none(rev)
        if cid is None:
            raise StoreError("no commits yet")
        active = {e.expert for e in self._tree(cid)}
        found: FactBlame | None = None
        for commit_id, commit in reversed(self.log(cid)):
            if commit.expert is None:
                continue
            for record in self.store.read_facts(commit.expert.facts):
                if prompt_or_id not in (record["prompt"], record["id"]):
                    continue
                if found is None:
                    found = FactBlame(record["id"], record["prompt"], record["target"], commit_id, commit_id, False)
                elif record["target"] != found.target:
                    found.target, found.last_changed_by = record["target"], commit_id
                found.active = commit.expert.expert in active
        if found is None:
            raise StoreError(f"no fact {prompt_or_id[:80]!r} in the history of {cid[:12]}")
        return found

