"""Tensors as safetensors bytes (never pickle): what expert and anchor objects hold.

Reading a blob's header and checking its layout need no torch, so `fsck`, `show` and `log` stay fast;
only `pack` and `unpack` import it.
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING

from .errors import CorruptObjectError

if TYPE_CHECKING:
    import torch

_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def pack(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """Deterministic bytes for the same tensors and metadata (metadata values are JSON-encoded)."""
    from safetensors.torch import save

    meta = {k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    return save({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, metadata=meta)


def unpack(data: bytes, oid: str = "?") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load

    meta = metadata(data, oid)
    try:
        return load(data), meta
    except Exception as exc:  # any parse failure of a stored object is corruption
        raise CorruptObjectError(f"object {oid} is not a valid safetensors blob: {exc}") from None


def _header(data: bytes, oid: str) -> tuple[dict, int]:
    """(the JSON header, where the tensor bytes start)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header, 8 + length
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CorruptObjectError(f"object {oid} is not a valid safetensors blob: {exc}") from None


def metadata(data: bytes, oid: str = "?") -> dict:
    """A blob's metadata (JSON-decoded values), read from its header alone."""
    header, _ = _header(data, oid)
    try:
        return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
    except (TypeError, ValueError) as exc:
        raise CorruptObjectError(f"object {oid} has unreadable metadata: {exc}") from None


def check(data: bytes, oid: str = "?") -> None:
    """Raise CorruptObjectError unless the header describes tensors that tile the data exactly."""
    header, start = _header(data, oid)
    metadata(data, oid)
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            count = 1
            for size in info["shape"]:
                count *= int(size)
            expected = count * _ITEM_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptObjectError(f"object {oid}: tensor {name!r} is badly described: {exc}") from None
        if end - begin != expected:
            raise CorruptObjectError(f"object {oid}: tensor {name!r} has {end - begin} bytes, its shape needs {expected}")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise CorruptObjectError(f"object {oid}: tensor data has a gap or overlap at byte {begin}")
        position = end
    if start + position != len(data):
        raise CorruptObjectError(f"object {oid}: {len(data) - start} bytes of tensor data, the header describes {position}")
