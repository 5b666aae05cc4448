"""The model side of the server: one worker thread owns the model and runs one request at a time.

Routing state lives on the adaptor (the prefill decision, `last_routes`), so two requests must never
share the model at once. One worker gives every request the whole model: its own routing, the experts of
its own version (each version's adaptor is built once and swapped in, which costs nothing), and an answer
identical to the one it would get alone. On 2 CPU cores a second worker would only split the same cores.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..editing import LemoeAdaptor, reattach
from ..editing.batching import encode_prompt, model_device
from ..repo import Repo, RouteInfo
from ..stores import BadRevisionError
from .text import StreamedText

log = logging.getLogger("lemoe.serve")
T = TypeVar("T")
MODEL_PREFIX = "lemoe:"
DEFAULT_MODEL = "lemoe"  # the version given by `lemoe serve --rev`


class ModelNotFound(LookupError):
    """The `model` of a request names no version (404)."""


class BadRequest(ValueError):
    """A request the server understands but refuses (400)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()


@dataclass
class Generation:
    version: str
    route: RouteInfo
    prompt_tokens: int
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = "length"  # stop: EOS or a stop sequence; length: max_tokens reached
    cancelled: bool = field(default=False, repr=False)


class _Watch(StoppingCriteria):
    """Called by `generate` after every new token: reports the route once, streams settled text, and ends
    generation at a stop sequence or when the client has gone."""

    def __init__(self, generation: Generation, text: StreamedText, prompt_length: int,
                 on_start: Callable[[Generation], None], on_text: Callable[[str], None],
                 route: Callable[[], RouteInfo]) -> None:
        self.generation, self.text, self.prompt_length = generation, text, prompt_length
        self.on_start, self.on_text, self.route = on_start, on_text, route
        self.seen = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.seen == 0:  # the prompt has been routed (prefill) and the first token chosen
            self.generation.route = self.route()
            self.on_start(self.generation)
        new = input_ids[0, self.prompt_length + self.seen :].tolist()
        self.seen += len(new)
        piece = self.text.push(new)
        if piece:
            self.on_text(piece)
        done = self.text.stopped or self.generation.cancelled
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Resolves model names to versions and generates, always on its one worker thread (`call`)."""

    def __init__(self, repo: Repo, *, default_rev: str = "HEAD", max_tokens_cap: int = 512,
                 versions_kept: int = 8) -> None:
        self.repo = repo
        self.default_rev = default_rev
        self.max_tokens_cap = max_tokens_cap
        self.versions_kept = versions_kept
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lemoe-model")
        self._adaptors: OrderedDict[str, LemoeAdaptor] = OrderedDict()

    async def call(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def submit(self, fn: Callable[..., T], *args):
        return self._worker.submit(fn, *args)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    # -- worker-thread methods ---------------------------------------------------------------------------
    def load(self) -> None:
        """Load the base model (and check its fingerprint) before the first request."""
        self.repo.base_model()

    def context_length(self) -> int:
        model, _ = self.repo.base_model()
        return int(getattr(model.config, "max_position_embeddings", 2048))

    def resolve(self, name: str) -> str:
        """The commit a model name selects: `lemoe` (the served default), `lemoe:<rev>`."""
        if name == DEFAULT_MODEL:
            rev = self.default_rev
        elif name.startswith(MODEL_PREFIX) and len(name) > len(MODEL_PREFIX):
            rev = name[len(MODEL_PREFIX):]
        else:
            raise ModelNotFound(f"The model `{name}` does not exist: use `lemoe:<rev>` (a branch, tag, "
                                f"commit id prefix of 4 or more, or HEAD~N); GET /v1/models lists them")
        return self.repo.resolve(rev)

    def models(self) -> list[tuple[str, str, float]]:
        """(model name, commit, commit time) for the served default, HEAD, every branch and every tag."""
        names = []
        for name, rev in ((DEFAULT_MODEL, self.default_rev), (f"{MODEL_PREFIX}HEAD", "HEAD")):
            try:
                names.append((name, self.repo.resolve(rev)))
            except BadRevisionError:  # no commits yet
                pass
        names += [(f"{MODEL_PREFIX}{b}", cid) for b, cid in sorted(self.repo.branches().items())]
        names += [(f"{MODEL_PREFIX}{t}", cid) for t, cid in sorted(self.repo.tags().items())]
        return [(name, cid, self.repo.get_commit(cid).time) for name, cid in names]

    def encode_completion(self, prompt: str) -> list[int]:
        _, tokenizer = self.repo.base_model()
        return encode_prompt(tokenizer, prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        _, tokenizer = self.repo.base_model()
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this base model has no chat template: use /v1/completions")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The max_tokens to use (default: what fits, up to the cap); BadRequest past the limits."""
        context = self.context_length()
        if max_tokens is not None and max_tokens > self.max_tokens_cap:
            raise BadRequest(f"max_tokens is {max_tokens}, but this server allows at most {self.max_tokens_cap}")
        wanted = max_tokens if max_tokens is not None else min(self.max_tokens_cap, context - prompt_tokens)
        if prompt_tokens + max(wanted, 1) > context:
            raise BadRequest(f"This model's maximum context length is {context} tokens. However, you requested "
                             f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, {wanted} in the "
                             f"completion). Please reduce the length of the prompt or completion.")
        return wanted

    def generate(self, cid: str, prompt_ids: list[int], sampling: Sampling, *,
                 on_start: Callable[[Generation], None] = lambda g: None,
                 on_text: Callable[[str], None] = lambda s: None,
                 generation: Generation | None = None) -> Generation:
        """Generate at version `cid`; `on_start` once the route is known, `on_text` with each settled piece."""
        model, tokenizer = self.repo.base_model()
        self._install(cid)
        generation = generation or Generation(cid, RouteInfo(None, None, None, None), len(prompt_ids))
        generation.version, generation.prompt_tokens = cid, len(prompt_ids)
        text = StreamedText(lambda ids: tokenizer.decode(ids, skip_special_tokens=True,
                                                         clean_up_tokenization_spaces=False), sampling.stops)
        watch = _Watch(generation, text, len(prompt_ids), on_start, on_text, lambda: self.repo.last_route(model, cid))
        ids = torch.tensor([prompt_ids], device=model_device(model))
        options: dict = {"do_sample": False}
        if sampling.temperature > 0:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=sampling.max_tokens, pad_token_id=tokenizer.pad_token_id,
                                    stopping_criteria=StoppingCriteriaList([watch]), **options)
        new_tokens = output[0, len(prompt_ids):].tolist()
        rest = text.finish()
        if rest:
            on_text(rest)
        generation.text = text.text()
        generation.completion_tokens = len(new_tokens)
        ended_at_eos = bool(new_tokens) and new_tokens[-1] in _eos_ids(model, tokenizer)
        generation.finish_reason = "stop" if text.stopped or ended_at_eos else "length"
        return generation

    def _install(self, cid: str) -> None:
        """Put the experts of version `cid` on the model, building its adaptor once."""
        model, _ = self.repo.base_model()
        adaptor = self._adaptors.get(cid)
        if adaptor is None:
            log.info("loading the experts of %s", cid[:12])
            adaptor = self.repo.attach_experts(model, cid)
            self._adaptors[cid] = adaptor
            while len(self._adaptors) > self.versions_kept:
                self._adaptors.popitem(last=False)
        else:
            reattach(model, adaptor)
        self._adaptors.move_to_end(cid)


def _eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}
