"""Free-generation (WILD) metrics: what a user reads, not what teacher forcing scores.

The protocol of "The Mirage of Model Editing" (2025), as `../shared/data/README.md` defines it:
- an answer is the greedy continuation of a prompt (at most 32 new tokens), cut at EOS, a newline or the
  end of the first sentence;
- **WILD Rel / Gen**: the normalised answer (case, whitespace, punctuation, one leading article) starts
  with the normalised target, after the edit prompt / after a rephrase;
- **WILD Loc**: a locality prompt's answer equals the base model's answer;
- **fluency**: ROME's generation entropy (the weighted mean of word-bigram and trigram entropies, weights
  2/3 and 4/3) of a 48-token continuation of each edit prompt, never stopped (EOS suppressed), edited
  against base on the same prompts; **degenerate**: the share of those continuations whose distinct
  word-bigram ratio is below 0.5 (a loop such as "Idaho, Idaho, Idaho"), or that hold fewer than two
  words (48 tokens of "?" or of newlines).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch
from transformers import StoppingCriteria

from .batching import encode_prompt, left_pad, model_device

ANSWER_TOKENS = 32
CONTINUATION_TOKENS = 48
DEGENERATE_RATIO = 0.5
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_SETTLED_END = re.compile(r"[.!?]\s|\n")  # a cut point no later token can move
_WORD = re.compile(r"\w+|[^\w\s]")  # words and punctuation marks, as nltk's word_tokenize splits them
_ARTICLE = re.compile(r"^(a|an|the)\s+")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def stop_answer(text: str) -> str:
    """The answer as a reader takes it: up to the first newline, then up to the end of the first sentence
    (the sentence's closing mark kept)."""
    text = text.split("\n", 1)[0]
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed, one leading article dropped."""
    text = " ".join(text.lower().translate(_PUNCTUATION).split())
    return _ARTICLE.sub("", text)


def starts_with_target(answer: str, target: str) -> bool:
    wanted = normalise(target)
    return bool(wanted) and normalise(answer).startswith(wanted)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngram_entropy(tokens: list[str], n: int) -> float:
    grams = Counter(zip(*(tokens[i:] for i in range(n))))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def generation_entropy(text: str) -> float:
    """ROME's n-gram entropy of one text: mean of (2/3 · bigram, 4/3 · trigram) entropy in bits."""
    tokens = words(text)
    return (2 / 3 * _ngram_entropy(tokens, 2) + 4 / 3 * _ngram_entropy(tokens, 3)) / 2


def distinct_bigram_ratio(text: str) -> float:
    """Distinct word bigrams over all of them; 0 for a text of fewer than two words, which has no content
    to be fluent with (a continuation of 48 tokens gets there only by repeating punctuation or blanks)."""
    tokens = [t for t in words(text) if t.isalnum()]
    bigrams = list(zip(tokens, tokens[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def is_degenerate(text: str) -> bool:
    return distinct_bigram_ratio(text) < DEGENERATE_RATIO


class _AnswersSettled(StoppingCriteria):
    """Per row: done once its answer's cut point is settled (a newline, or a sentence end followed by
    whitespace), so stopping there gives exactly the answer 32 tokens would have given."""

    def __init__(self, tokenizer, prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([bool(_SETTLED_END.search(t)) for t in texts], device=input_ids.device)


@torch.no_grad()
def greedy_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, *, stopped: bool,
                 batch_size: int = 32) -> list[str]:
    """Greedy continuations of `prompts` (batched, left-padded; each routes as it would alone).

    stopped=True: cut as an answer (EOS, newline, first sentence end); False: exactly `max_new_tokens`
    tokens, EOS suppressed, for fluency.
    """
    device = model_device(model)
    eos = tokenizer.eos_token_id
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
        options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if stopped:
            options |= dict(stopping_criteria=[_AnswersSettled(tokenizer, ids.shape[1])])
        else:
            options |= dict(min_new_tokens=max_new_tokens, eos_token_id=eos)
        output = model.generate(input_ids=ids, attention_mask=mask, **options)
        for row in output[:, ids.shape[1]:].tolist():
            if stopped and eos in row:
                row = row[: row.index(eos)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            texts.append(stop_answer(text) if stopped else text)
    return texts


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
