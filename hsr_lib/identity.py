"""What identifies an input (docs/run-directory.md, "What identifies an input"): content, never location.

* :func:`file_hash` — a file's content hash, computed once per file version and cached per machine
  in ``$HSR_CACHE/hashes/`` (:func:`hsr_lib.io.cached_file_hash`);
* :func:`model_fingerprint` — a model: ``tiny:`` its build version and seed, ``toy:`` and a local
  folder the bytes of its weight, config, tokenizer, processor and chat-template files, an HF id the
  commit its name resolves to in the local Hugging Face cache;
* :func:`images_fingerprint` — a list of images by content, in order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .io import cached_file_hash, stable_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".onnx")
MODEL_FILE_SUFFIXES = (*WEIGHT_SUFFIXES, ".json", ".jinja", ".model", ".tiktoken", ".txt", ".py")
NOT_MODEL_FILES = ("toy_card.json",)  # documentation: the toy's card carries its training time


class IdentityError(ValueError):
    """An input whose identity cannot be established; the message names it."""


def file_hash(path: str | os.PathLike) -> str:
    """A short sha256 of the file's bytes, computed once per file version on this machine
    (:func:`hsr_lib.io.cached_file_hash`: cached in ``$HSR_CACHE/hashes/``)."""
    return cached_file_hash(path)


def images_fingerprint(paths: Iterable[str | os.PathLike | None]) -> str:
    """The images of a list, in order, by content (a missing file counts as ``None``: the step that
    reads it names it)."""
    return stable_hash([None if p is None else _hash_or_none(p) for p in paths])


def _hash_or_none(path: str | os.PathLike) -> str | None:
    try:
        return cached_file_hash(path)
    except OSError:  # missing, or not a file
        return None


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files that make a saved model: weights, configs, tokenizer, processor and chat template
    (hidden files and folders, READMEs, images and the toy's card are not part of it)."""
    root = Path(folder)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() in MODEL_FILE_SUFFIXES and p.name not in NOT_MODEL_FILES:
            out.append(p)
    return out


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A saved model folder by the content of :func:`model_files` (relative names: a moved or
    copied folder keeps it)."""
    root = Path(folder)
    return stable_hash({str(p.relative_to(root)): file_hash(p) for p in model_files(root)})


def hf_revision(name: str) -> str:
    """The commit an HF id resolves to in the local Hugging Face cache (``refs/main``). Online, a
    model not yet in the cache gets its config downloaded first (which records the commit);
    otherwise an :class:`IdentityError` naming it."""
    from huggingface_hub import try_to_load_from_cache

    def cached() -> str | None:
        try:
            found = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a valid repo id
            return None
        return Path(found).parent.name if isinstance(found, str) else None

    commit = cached()
    if commit is None and os.environ.get("HF_HUB_OFFLINE", "") in ("", "0"):
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(name, "config.json")
        except Exception:  # no network, no such repo, gated: named below
            pass
        commit = cached()
    if commit is None:
        raise IdentityError(f"model.name = {name!r}: not in the local Hugging Face cache, so its revision "
                            f"cannot be known; download it first (hf download {name}), or point model.name "
                            "at a local folder")
    return commit


def is_local_model(name: str) -> bool:
    """True when ``name`` is a local folder (not ``tiny:``/``toy:``, not an HF id)."""
    return not name.startswith(("tiny:", "toy:")) and Path(name).expanduser().is_dir()


def model_fingerprint(name: str, seed: int = 0) -> str:
    """What identifies ``model.name`` by content: ``tiny:<family>`` its build version and ``seed``;
    ``toy:…`` and a local folder the bytes of its model files; an HF id ``hf:<commit>`` of its local
    snapshot. An unknown name raises :class:`IdentityError` (``tiny:``: ValueError) naming it."""
    if name.startswith("tiny:"):
        from .tiny import BUILD_VERSION

        return stable_hash({"tiny": name[5:], "build": BUILD_VERSION, "seed": seed})
    if name.startswith("toy:"):
        from .toy_model import checkpoint

        try:
            return folder_fingerprint(checkpoint(name))
        except (ValueError, FileNotFoundError) as err:
            raise IdentityError(f"model.name = {name!r}: {err}") from None
    path = Path(name).expanduser()
    if path.is_dir():
        return folder_fingerprint(path)
    return f"hf:{hf_revision(name)}"


__all__ = ["IdentityError", "file_hash", "folder_fingerprint", "hf_revision", "images_fingerprint", "is_local_model",
           "model_files", "model_fingerprint"]
