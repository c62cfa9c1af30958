"""Bit-packed boolean masks in safetensors (docs/method.md): one uint8 tensor per module, 8 weights a byte.

A mask file maps ``layers.{i}.{module}`` to ``numpy.packbits`` of the flattened boolean mask
(big-endian bit order, numpy's default); the shapes travel in the file's metadata. In pruning
masks ``True`` means *pruned* (the weight is zero), the set P of docs/method.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .io import honour_umask

FORMAT = "hsr-packbits-v1"


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as a flat uint8 tensor of its packed bits."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack: expected a bool tensor, got {mask.dtype}")
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().ravel()))


def unpack(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack` packed."""
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.cpu().numpy(), count=n).astype(bool)
    return torch.from_numpy(bits.reshape(tuple(shape)))


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to a temporary file in the same folder, then ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata or {}))
        _canonical_header(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _canonical_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header with sorted keys (same length, same offsets), so equal tensors
    and metadata give byte-identical files: the writer orders the metadata differently each time."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > n:
            raise ValueError(f"{path}: canonical safetensors header longer than the original")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def save_masks(path: str | os.PathLike, masks: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write boolean masks bit-packed (uint8) with their shapes in the metadata, atomically."""
    return save_packed(path, {k: pack(v) for k, v in masks.items()}, {k: list(v.shape) for k, v in masks.items()},
                       metadata)


def save_packed(path: str | os.PathLike, packed: Mapping[str, torch.Tensor], shapes: Mapping[str, list[int]],
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write masks already packed by :func:`pack` (so that a whole model's masks are never held
    unpacked), with their ``shapes``, atomically."""
    meta = {"format": FORMAT, "shapes": json.dumps({k: list(shapes[k]) for k in packed}), **dict(metadata or {})}
    return atomic_save_safetensors(path, dict(packed), meta)


def mask_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a mask file (format, shapes and whatever the writer added)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_masks(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks from a file written by :func:`save_masks` (all, or only ``keys``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an hsr mask file (format {meta.get('format')!r}, expected {FORMAT!r})")
        shapes = json.loads(meta["shapes"])
        names = list(f.keys()) if keys is None else keys
        missing = [k for k in names if k not in shapes]
        if missing:
            raise KeyError(f"{path}: no mask for {missing[0]!r}")
        return {k: unpack(f.get_tensor(k), shapes[k]) for k in names}


def mask_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """The shape of every mask in a file, without unpacking any."""
    return json.loads(mask_metadata(path)["shapes"])


def rewrite_masks(src: str | os.PathLike, dst: str | os.PathLike, changed: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``dst`` = the masks of ``src`` with those in ``changed`` replaced (boolean, or already
    :func:`pack`-ed as uint8); the others are copied still packed (a 7B model's masks never exist
    unpacked all at once)."""
    from safetensors import safe_open

    shapes = mask_shapes(src)
    for k, v in changed.items():
        if v.dtype == torch.uint8:
            if k not in shapes or v.numel() != (int(np.prod(shapes[k])) + 7) // 8:
                raise ValueError(f"{src}: packed mask {k!r} does not fit the shape {shapes.get(k)}")
        elif list(v.shape) != shapes.get(k):
            raise ValueError(f"{src}: mask {k!r} has shape {shapes.get(k)}, the replacement {list(v.shape)}")
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: (changed[k] if changed[k].dtype == torch.uint8 else pack(changed[k])) if k in changed
                   else f.get_tensor(k) for k in f.keys()}
    return atomic_save_safetensors(dst, tensors, {**meta, **dict(metadata or {})})
