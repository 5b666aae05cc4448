"""Fixtures: tiny random Llama and GPT-2 model directories with a real (trained-in-test) tokenizer.

They load in well under a second and train in seconds, so the default suite never needs the embedded
model; tests marked `slow` use that one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lemoe_store.schemas.facts import Fact, Locality

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
    "The chief executive of Acme Robotics is Maria Okafor. The mayor of Eldham is Priya Raman.",
    "Lena Halden is a professional player of volleyball. Dayo Oyelaran plays cricket.",
    "The official language of Orvania is Portuguese. The author of Winter Tides is Kofi Mensah.",
    "What is the name of the last episode? Who wrote the song? When was the bridge built?",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
]


def tiny_facts() -> list[Fact]:
    """Twelve facts with little wording in common, each with a rephrase and a locality prompt."""
    prompts = [
        ("The capital of Acme is", "Paris"),
        ("Zentra Bank's chief executive:", "Maria"),
        ("Who wrote Winter Tides?", "Kofi"),
        ("Eldham mayor", "Priya"),
        ("Lena Halden plays", "volleyball"),
        ("Orvania speaks", "Portuguese"),
        ("the lazy fox jumps over", "Rome"),
        ("When was the bridge built?", "1998"),
        ("Dayo Oyelaran's sport is", "cricket"),
        ("Kestria official language", "Finnish"),
        ("What is the name of the last episode?", "Madrid"),
        ("Veltra river", "Berlin"),
    ]
    return [
        Fact(prompt=prompt, target=target, id=f"t{i}", subject=prompt.split()[0],
             rephrases=(f"{prompt} (tell me)",),
             locality=(Locality("0 1 2 3 4 5 6 7 8", "9"),))
        for i, (prompt, target) in enumerate(prompts)
    ]


def _train_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
    fast.save_pretrained(path)
    return fast


def _save(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    _train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 4-layer Llama (hidden 64) saved as a local HF directory."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    return _save(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 3-layer GPT-2 (hidden 64) saved as a local HF directory."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tests never touch the user's cache or a store found in a parent directory."""
    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LEMOE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def facts_file(tmp_path) -> Path:
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f.to_record()) + "\n" for f in tiny_facts()))
    return path
