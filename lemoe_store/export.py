"""Export one version as a self-describing, peft-like folder, and load it back as a ready model.

    OUT_DIR/
      lemoe_adapter.json     # base-model id + fingerprint, layer, expert shape, threshold, commit, experts
      experts.safetensors    # expert i's weights as `experts.{i}.{name}`
      anchors.safetensors    # expert i's anchor keys as `anchors.{i}`
      facts.jsonl            # the facts edited at this version
      base/                  # with --with-base: the base model itself, so the folder runs anywhere

`load_version(OUT_DIR)` (or `load_version(STORE, rev)`) returns `(model, tokenizer)`: a transformers model
with the routed LEMoE adaptor attached, for users who serve it themselves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from . import models
from .editing import EditConfig, ExpertArtifact, attach
from .repo import Repo
from .schemas.facts import canonical_jsonl
from .stores import StoreError

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
        "edit": config.to_dict(),
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


def load_version(path: str | Path, rev: str | None = None, device: str = "auto"):
    """(model, tokenizer) with the adaptor of an exported folder, or of `rev` in the store at `path`."""
    folder = Path(path).expanduser()
    if not (folder / ADAPTER_FILE).is_file():
        repo = Repo.open(folder, device=device)
        return repo.model_at(rev or "HEAD")
    if rev is not None:
        raise ExportError(f"{folder} is an exported version; it has no other revision than its own")
    manifest = _read_manifest(folder)
    base = manifest["base_model"]
    source = folder / base["path"] if base.get("path") else models.resolve_model(base["id"]).path
    found = models.fingerprint(source)
    if found != base["fingerprint"]:
        raise ExportError(f"base model at {source} has fingerprint {found[:12]}, the export needs "
                          f"{base['fingerprint'][:12]}: refusing to mix models")
    model, tokenizer = models.load_model(str(source), device=device)
    weights = load_file(folder / "experts.safetensors")
    anchors = load_file(folder / "anchors.safetensors")
    artifacts = []
    for entry in manifest["experts"]:
        i = entry["index"]
        prefix = f"experts.{i}."
        expert_weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        artifacts.append(ExpertArtifact(expert_weights, anchors[f"anchors.{i}"], list(entry["anchor_facts"]),
                                        anchor_spans=entry.get("anchor_spans"),
                                        anchor_subjects=entry.get("anchor_subjects")))
    attach(model, artifacts, EditConfig.from_dict(manifest["edit"]))
    return model, tokenizer


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / ADAPTER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{folder / ADAPTER_FILE}: unreadable: {exc}") from None
    if manifest.get("format") != "lemoe-adapter" or manifest.get("format_version") != ADAPTER_FORMAT:
        raise ExportError(f"{folder / ADAPTER_FILE}: not a lemoe adapter of format {ADAPTER_FORMAT}")
    for key in ("base_model", "edit", "experts", "commit"):
        if key not in manifest:
            raise ExportError(f"{folder / ADAPTER_FILE}: missing field {key!r}")
    return manifest
