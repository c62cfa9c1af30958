"""Loading a VLM (HF id, local path or ``tiny:<name>``) with its processor and family adapter,
on the chosen device and dtype."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import FamilyAdapter, Geometry, adapter_for, chat_style
from .processors import load_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model that cannot be loaded or is not supported; the message names it."""


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' → the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise ModelError(f"model.device = {spec!r}: use auto, cpu, cuda or cuda:<index>")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device = {spec!r} but no CUDA device is available here")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' → bfloat16 on a GPU that supports it, float32 otherwise."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ModelError(f"model.dtype = {spec!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


@dataclass
class LoadedModel:
    """A model, its processor and its family adapter, with the resolved device and dtype."""

    model: nn.Module
    processor: Any
    adapter: FamilyAdapter
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def geometry(self) -> Geometry:
        return self.adapter.geometry(self.model.config)

    @property
    def chat_style(self) -> str:
        return chat_style(self.processor)

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.decoder_layers(self.model)

    def prunable_linears(self) -> dict[str, nn.Linear]:
        return self.adapter.prunable_linears(self.model)

    def save(self, path: str | os.PathLike) -> Path:
        """Save model and processor as an HF model directory."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        return path


def save_model_dir(lm: LoadedModel, path: str | os.PathLike) -> Path:
    """Save ``lm`` as an HF model directory, atomically: into a hidden sibling folder, then renamed."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _toy(name: str) -> Path:
    """The checkpoint folder of ``toy:<...>`` (trained on first use); a ModelError naming it otherwise."""
    from .toy_model import checkpoint

    try:
        return checkpoint(name)
    except (ValueError, FileNotFoundError) as err:
        raise ModelError(f"model.name = {name!r}: {err}") from None


def _tiny(name: str, seed: int):
    """``(model, processor)`` of ``tiny:<name>``; an unknown name is a ModelError naming it."""
    from .tiny import build_tiny

    try:
        return build_tiny(name.removeprefix("tiny:"), seed=seed)
    except ValueError as err:
        raise ModelError(f"model.name = {name!r}: {err}") from None


def _hub(name: str) -> dict[str, str]:
    """``{"revision": <commit>}`` for an HF id (load exactly the snapshot its key names), ``{}`` for a
    local folder; a ModelError naming an id whose revision cannot be resolved."""
    from .identity import IdentityError, hf_revision

    if Path(name).expanduser().is_dir():
        return {}
    try:
        return {"revision": hf_revision(name)}
    except IdentityError as err:
        raise ModelError(str(err)) from None


def load_model(name: str, family: str = "auto", dtype: str = "auto", device: str = "auto",
               attn_implementation: str = "sdpa", seed: int = 0) -> LoadedModel:
    """Load ``name``: an HF id, a local folder, or ``tiny:<name>`` (random weights, built in code)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name.startswith("toy:"):  # a trained teaching toy: a local checkpoint under its own name
        lm = load_model(str(_toy(name)), family, dtype, device, attn_implementation, seed)
        lm.name = name
        return lm
    if name.startswith("tiny:"):
        model, processor = _tiny(name, seed)
        model.config._attn_implementation = attn_implementation
        model.to(device=dev, dtype=dt)
    else:
        from transformers import AutoConfig, AutoModelForImageTextToText

        hub = _hub(name)
        try:
            config = AutoConfig.from_pretrained(name, **hub)
        except (OSError, ValueError) as err:
            where = "local folder" if Path(name).exists() else "HF id (not in the local cache?)"
            raise ModelError(f"model.name = {name!r}: cannot read its config as a {where}: {err}") from None
        try:
            adapter_for(config, family)
        except ValueError as err:
            raise ModelError(f"model.name = {name!r}: {err}") from None
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dt, attn_implementation=attn_implementation, **hub).to(dev)
        processor = load_processor(name, **hub)
    model.eval()
    try:
        adapter = adapter_for(model.config, family)
    except ValueError as err:
        raise ModelError(f"model.name = {name!r}: {err}") from None
    if family != "auto" and model.config.model_type not in adapter.model_types:
        raise ModelError(f"model.family = {family!r} but {name!r} is a {model.config.model_type!r} model")
    return LoadedModel(model, processor, adapter, name, dev, dt)


def load_from_params(P) -> LoadedModel:
    """Load the model a params object names (section ``model``)."""
    m = P.model
    return load_model(m.name, family=m.family, dtype=m.dtype, device=m.device,
                      attn_implementation=m.attn_implementation, seed=P.seed)


def load_processor_only(name: str, seed: int = 0):
    """The processor of ``name`` without loading its weights (tiny models are built whole: cheap)."""
    if name.startswith("toy:"):
        name = str(_toy(name))
    if name.startswith("tiny:"):
        return _tiny(name, seed)[1]
    try:
        return load_processor(name, **_hub(name))
    except OSError as err:
        raise ModelError(f"model.name = {name!r}: cannot load its processor: {err}") from None


def model_config(name: str, seed: int = 0):
    """The config of ``name`` without loading its weights (tiny models are built whole: cheap)."""
    if name.startswith("toy:"):
        name = str(_toy(name))
    if name.startswith("tiny:"):
        return _tiny(name, seed)[0].config
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **_hub(name))
    except (OSError, ValueError) as err:
        raise ModelError(f"model.name = {name!r}: cannot read its config: {err}") from None
