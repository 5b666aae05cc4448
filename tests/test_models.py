"""Model loading: local directories, fingerprints, offline behaviour, clear errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lemoe_store import __version__
from lemoe_store.cli import app
from lemoe_store.models import ModelError, fingerprint, load_model, resolve_model


def test_local_directory_loads_frozen_in_eval_mode(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir), device="cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None


def test_fingerprint_is_stable_and_content_sensitive(tiny_llama_dir, tiny_gpt2_dir):
    first = fingerprint(tiny_llama_dir)
    assert first == fingerprint(tiny_llama_dir)
    assert len(first) == 64
    assert first != fingerprint(tiny_gpt2_dir)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="neither an embedded model"):
        resolve_model(str(tmp_path / "nowhere"))


def test_pickled_weights_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="safetensors"):
        load_model(str(tmp_path))


def test_version_and_help_list_the_commands():
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"lemoe {__version__}"
    help_text = runner.invoke(app, ["--help"]).stdout
    for command in ("init", "commit", "log", "show", "status", "checkout", "ask", "eval", "reindex", "quickstart"):
        assert command in help_text
