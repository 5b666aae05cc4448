"""Tensors as safetensors bytes (never pickle): what expert and anchor objects hold."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from .errors import CorruptObjectError


def pack(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """Deterministic bytes for the same tensors and metadata (metadata values are JSON-encoded)."""
    meta = {k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    return _save({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, metadata=meta)


def unpack(data: bytes, oid: str = "?") -> tuple[dict[str, torch.Tensor], dict]:
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        metadata = {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
        return _load(data), metadata
    except Exception as exc:  # any parse failure of a stored object is corruption
        raise CorruptObjectError(f"object {oid} is not a valid safetensors blob: {exc}") from None
