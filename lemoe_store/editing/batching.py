"""Tokenising prompt/answer pairs and running them, padded, through a (possibly adapted) causal LM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..errors import FactsError
from .adaptor import KeysRead, LemoeAdaptor, find_adaptor


@dataclass(frozen=True)
class Pair:
    """A prompt and the answer that should follow it, as token ids."""

    prompt: list[int]
    answer: list[int]


def answer_text(prompt: str, answer: str) -> str:
    """EasyEdit joins prompt and answer with one space unless either side already has one."""
    return answer if prompt.endswith((" ", "\n")) or answer.startswith((" ", "\n")) else " " + answer


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise FactsError(f"prompt {prompt[:40]!r} encodes to no tokens")
    return ids


def encode_pair(tokenizer, prompt: str, answer: str) -> Pair:
    answer_ids = tokenizer(answer_text(prompt, answer), add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise FactsError(f"answer {answer[:40]!r} encodes to no tokens")
    return Pair(encode_prompt(tokenizer, prompt), answer_ids)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, T), rows aligned to end at the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids that ignore padding, so a padded row computes what it would alone."""
    pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return pos if offset is None else pos + offset[:, None]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class TeacherForced:
    """One pair read teacher-forced: the argmax at each answer position, and the answer's mean NLL (nats)."""

    predictions: list[int]
    nll: float


def teacher_forced_predictions(model, tokenizer, pairs: list[Pair], batch_size: int = 16) -> list[list[int]]:
    """For each pair, the model's argmax at each answer position, given the true answer prefix."""
    return [row.predictions for row in teacher_forced(model, tokenizer, pairs, batch_size)]


@torch.no_grad()
def teacher_forced(model, tokenizer, pairs: list[Pair], batch_size: int = 16) -> list[TeacherForced]:
    """Each pair's answer read with the true answer prefix: argmax per position and mean NLL.

    If the model carries a LEMoE adaptor, routing uses the prompt tokens only, exactly as generation
    would (the answer tokens are not part of the routing key).
    """
    adaptor: LemoeAdaptor | None = find_adaptor(model)
    device = model_device(model)
    rows: list[TeacherForced] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask = left_pad([p.prompt + p.answer for p in chunk], tokenizer.pad_token_id, device)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        if adaptor is not None:
            lengths = torch.tensor([len(p.prompt) for p in chunk], device=device)
            with adaptor.teacher_forcing(lengths):
                logits = model(**kwargs).logits
        else:
            logits = model(**kwargs).logits
        width = ids.shape[1]
        for row, pair in enumerate(chunk):
            answer_logits = logits[row, width - len(pair.answer) - 1 : width - 1].float()
            answer = torch.tensor(pair.answer, device=answer_logits.device)
            nll = torch.nn.functional.cross_entropy(answer_logits, answer)
            rows.append(TeacherForced(answer_logits.argmax(dim=-1).tolist(), float(nll)))
    return rows


def prompt_prefix(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the K/V cache of left-padded prompts without their last token: the base model's at every
    layer whatever the adaptor routes, since an expert acts from the last prompt token on."""
    return [(k[..., :-1, :].detach(), v[..., :-1, :].detach()) for k, v, *_ in cache]


def chunk_layout(prompt_mask: torch.Tensor, chunk_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids of right-padded chunks run on a `prompt_prefix`: each row's chunk
    starts at its last prompt token, so it reads as the row's sequence run whole."""
    attention = torch.cat([prompt_mask[:, :-1], chunk_mask], dim=1)
    start = prompt_mask.sum(dim=1) - 1
    return attention, start[:, None] + torch.arange(chunk_mask.shape[1], device=chunk_mask.device)[None, :]


@torch.no_grad()
def greedy_continuations(model, tokenizer, pairs: list[Pair], tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    """For each pair, the model's next `tokens` greedy tokens after prompt + answer, and its log-probabilities
    (tokens, vocab) at each of those positions (run on the base model: what an edit should leave alone)."""
    ids, mask = left_pad([p.prompt for p in pairs], tokenizer.pad_token_id, model_device(model))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=1)
    return continue_after_answers(model, pairs, mask, prompt_prefix(out.cache), tokens, tokenizer.pad_token_id)


@torch.no_grad()
def continue_after_answers(model, pairs: list[Pair], prompt_mask: torch.Tensor, prefix, tokens: int,
                           pad_id: int) -> list[tuple[list[int], torch.Tensor]]:
    """`greedy_continuations` on the prompts' `prompt_prefix` (as an edit batch already holds it): only each
    row's last prompt token and answer are run, then one token at a time; logits where they are read."""
    device = prompt_mask.device
    width = 1 + max(len(p.answer) for p in pairs)
    chunk = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    chunk_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, pair in enumerate(pairs):
        chunk[row, : 1 + len(pair.answer)] = torch.tensor(pair.prompt[-1:] + pair.answer)
        chunk_mask[row, : 1 + len(pair.answer)] = 1
    mask, chunk_positions = chunk_layout(prompt_mask, chunk_mask.to(device))
    answers = torch.tensor([len(p.answer) for p in pairs], device=device)
    out = model.base_model(input_ids=chunk.to(device), attention_mask=mask, position_ids=chunk_positions,
                           cache=DynamicCache(ddp_cache_data=prefix, config=model.config), use_cache=True)
    rows = torch.arange(len(pairs), device=device)
    logits = model.get_output_embeddings()(out.last_hidden_state[rows, answers])
    position = chunk_positions[rows, answers][:, None]  # of each row's last answer token
    cache = out.cache
    chosen: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    for step in range(tokens):
        last = logits.float().log_softmax(dim=-1)
        logprobs.append(last.cpu())
        chosen.append(last.argmax(dim=-1, keepdim=True))
        if step + 1 < tokens:  # the right padding of the chunk stays masked out
            mask = torch.cat([mask, torch.ones_like(chosen[-1])], dim=1)
            position = position + 1
            out = model(input_ids=chosen[-1], attention_mask=mask, position_ids=position, cache=cache,
                        use_cache=True, logits_to_keep=1)
            logits, cache = out.logits[:, -1], out.cache
    return list(zip(torch.cat(chosen, dim=1).tolist(), torch.stack(logprobs, dim=1)))  # (tokens,), (tokens, vocab)


@torch.no_grad()
def routing_keys(model, tokenizer, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Routing keys (N, H) of prompts, computed by the model's adaptor exactly as at inference (the
    forward stops at the key layer)."""
    adaptor = find_adaptor(model)
    if adaptor is None:
        raise ValueError("the model carries no LEMoE adaptor: attach() one first")
    device = model_device(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
        with adaptor.reading_keys():
            try:
                model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
            except KeysRead:
                pass
        out.append(adaptor.last_keys.cpu())
    return torch.cat(out)


def token_accuracy(predicted: list[int], expected: list[int]) -> float:
    return sum(int(p == e) for p, e in zip(predicted, expected)) / len(expected)
