"""Export one version as a self-describing, peft-like folder, and load it back as a ready model.

    OUT_DIR/
      lemoe_adapter.json     # base-model id + fingerprint, layer, expert shape, threshold, commit, experts
      experts.safetensors    # expert i's weights as `experts.{i}.{name}`
      anchors.safetensors    # expert i's anchor keys as `anchors.{i}`
      facts.jsonl            # the facts edited at this version
      base/                  # with --with-base: the base model itself, so the folder runs anywhere

`load_version(OUT_DIR)` (or `load_version(STORE, rev)`) returns `(model, tokenizer)`: a transformers model
with the routed LEMoE adaptor attached, for users who serve it themselves. `attach_version(model, …)` does
the same to a model the user loaded, peft-style, after checking it is the right base model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from . import models
from .editing import AdaptorConfig, ExpertArtifact, attach, find_adaptor
from .editing.routing import IndexCache
from .errors import ModelError, StoreError
from .repo import Repo
from .schemas.facts import canonical_jsonl

ADAPTER_FILE = "lemoe_adapter.json"
ADAPTER_FORMAT = 1


class ExportError(StoreError):
    pass


def export_version(repo: Repo, rev: str, out_dir: str | Path, with_base: bool = False) -> Path:
    """Write version `rev` of `repo` to `out_dir` (which must not exist or be empty), all or nothing."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory")
    cid = repo.store.resolve(rev)
    commit = repo.store.read_commit(cid)
    experts = repo.experts_at(cid)
    config = repo.config
    base = repo.store.config["base_model"]
    manifest = {
        "format": "lemoe-adapter",
        "format_version": ADAPTER_FORMAT,
        "commit": cid,
        "message": commit.message,
        "base_model": {**base, "path": "base" if with_base else None},
        "layer": config.layer,
        "expert_shape": {"hidden": base["hidden"], "rank": config.rank},
        "threshold": config.threshold,
        "adaptor": config.adaptor().to_dict(),
        "experts": [
            {"index": i, "expert": entry.expert, "anchors": entry.anchors, "facts": entry.facts,
             "rank": artifact.rank, "anchor_facts": artifact.anchor_facts,
             "anchor_spans": artifact.anchor_spans, "anchor_subjects": artifact.anchor_subjects}
            for i, (entry, artifact) in enumerate(zip(commit.tree, experts))
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        weights = {f"experts.{i}.{name}": t.contiguous() for i, a in enumerate(experts) for name, t in a.weights.items()}
        save_file(weights, staging / "experts.safetensors", metadata={"commit": cid})
        anchors = {f"anchors.{i}": a.anchors.float().contiguous() for i, a in enumerate(experts)}
        save_file(anchors, staging / "anchors.safetensors", metadata={"commit": cid})
        (staging / "facts.jsonl").write_bytes(canonical_jsonl(repo.facts_at(cid)))
        if with_base:
            _copy_base_model(models.resolve_model(base["id"]).path, staging / "base")
        (staging / ADAPTER_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _copy_base_model(source: Path, target: Path) -> None:
    """Config, tokenizer and safetensors weights: what `models.load_model` reads (never pickles)."""
    target.mkdir()
    for file in sorted(source.iterdir()):
        if file.is_file() and (file.suffix in {".json", ".safetensors", ".txt", ".model"}):
            shutil.copy2(file, target / file.name)


@dataclass
class _Version:
    """What attaching a version needs: its experts, the adaptor settings, and the base model it was made on."""

    experts: list[ExpertArtifact]
    config: AdaptorConfig
    base: dict  # id, fingerprint (and layers, hidden for stores)
    base_dir: Path  # where that base model's files are
    cache: IndexCache | None = None  # a store's cache/, for its approximate anchor index
    cid: str | None = None  # the commit, for a store's version


def _version(source: str | Path | Repo, rev: str | None) -> _Version:
    if isinstance(source, Repo):
        return _store_version(source, rev)
    folder = Path(source).expanduser()
    if not (folder / ADAPTER_FILE).is_file():
        return _store_version(Repo.open(folder), rev)
    if rev is not None:
        raise ExportError(f"{folder} is an exported version; it has no other revision than its own")
    manifest = _read_manifest(folder)
    base = manifest["base_model"]
    base_dir = folder / base["path"] if base.get("path") else models.resolve_model(base["id"]).path
    weights = load_file(folder / "experts.safetensors")
    anchors = load_file(folder / "anchors.safetensors")
    artifacts = []
    for entry in manifest["experts"]:
        prefix = f"experts.{entry['index']}."
        expert_weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        artifacts.append(ExpertArtifact(expert_weights, anchors[f"anchors.{entry['index']}"],
                                        list(entry["anchor_facts"]), anchor_spans=entry.get("anchor_spans"),
                                        anchor_subjects=entry.get("anchor_subjects")))
    settings = manifest.get("adaptor") or manifest["edit"]  # "edit": exports made before the split
    return _Version(artifacts, AdaptorConfig.from_dict(settings), base, base_dir)


def _store_version(repo: Repo, rev: str | None) -> _Version:
    cid = repo.head()[1] if rev is None else repo.resolve(rev)  # an empty store: the base model alone
    base = repo.store.config["base_model"]
    return _Version(repo.experts_at(cid), repo.config, base, models.resolve_model(base["id"]).path, repo.store, cid)


def _check_base_dir(directory: Path, version: _Version) -> None:
    """Refuse model files that differ from the base model the version was edited on."""
    found = models.fingerprint(directory)
    if found != version.base["fingerprint"]:
        raise ModelError(f"the model at {directory} has fingerprint {found[:12]}, but this version was edited "
                         f"on {version.base['id']} ({version.base['fingerprint'][:12]}): refusing to mix models")


def _check_base(model, version: _Version) -> None:
    loaded_from = Path(str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")))
    if not (loaded_from / "config.json").is_file():
        raise ModelError(f"cannot check that this model is {version.base['id']}: it was not loaded from a local "
                         f"directory (name_or_path {str(loaded_from)!r}); load it from {version.base_dir}, or "
                         "pass verify=False")
    _check_base_dir(loaded_from, version)


def attach_version(model, source: str | Path | Repo, rev: str | None = None, *, verify: bool = True):
    """Attach a version's routed experts to a model you loaded yourself (any dtype, any device); return it.

    `source` is a store (a path or a `Repo`; `rev` defaults to HEAD) or an exported folder. The model must
    be the base model the version was edited on: its directory's fingerprint is checked (`verify=False`
    skips that, e.g. for a model that was not loaded from a directory). Attaching replaces any version
    attached before; the base weights are never changed.

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        attach_version(model, "my-edits", "v1")
        with disable_experts(model):   # the base model, for comparison
            ...
    """
    return _attach(model, _version(source, rev), verify)


def _attach(model, version: _Version, verify: bool):
    if verify:
        _check_base(model, version)
    attach(model, version.experts, version.config, cache=version.cache, version=version.cid)
    return model


@contextmanager
def disable_experts(model) -> Iterator[None]:
    """Within: the model answers as its base model (its attached experts are bypassed)."""
    adaptor = find_adaptor(model)
    if adaptor is None:
        yield
        return
    with adaptor.bypassed():
        yield


def load_version(path: str | Path | Repo, rev: str | None = None, device: str = "auto"):
    """(model, tokenizer): a fresh base model with a version attached: of an exported folder, or `rev`
    (default HEAD) of a store. Each call returns a new, independent model."""
    version = _version(path, rev)
    _check_base_dir(version.base_dir, version)  # before loading: a wrong model fails fast
    model, tokenizer = models.load_model(str(version.base_dir), device=device)
    return _attach(model, version, verify=False), tokenizer


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / ADAPTER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{folder / ADAPTER_FILE}: unreadable: {exc}") from None
    if manifest.get("format") != "lemoe-adapter" or manifest.get("format_version") != ADAPTER_FORMAT:
        raise ExportError(f"{folder / ADAPTER_FILE}: not a lemoe adapter of format {ADAPTER_FORMAT}")
    for key in ("base_model", "experts", "commit"):
        if key not in manifest:
            raise ExportError(f"{folder / ADAPTER_FILE}: missing field {key!r}")
    if "adaptor" not in manifest and "edit" not in manifest:
        raise ExportError(f"{folder / ADAPTER_FILE}: missing field 'adaptor'")
    return manifest
