"""Model loading: local directories, fingerprints, offline behaviour, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def test_importing_lemoe_store_changes_no_environment_variable(tiny_llama_dir):
    """Offline loading is asked for per call (local_files_only), not forced on the whole process."""
    script = ("import os, json; before = dict(os.environ)\n"
              "import lemoe_store, lemoe_store.models, lemoe_store.repo, lemoe_store.export\n"
              "from lemoe_store.models import load_model\n"
              "load_model(os.environ['MODEL_DIR'], device='cpu')\n"
              "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")} | {"MODEL_DIR": str(tiny_llama_dir)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
