"""Layer-by-layer calibration on cached decoder inputs (docs/method.md).

One full VLM forward per batch of calibration samples (vision encoder, embeddings, rotary or
M-RoPE positions, masks, Mllama's cross-attention states) stops at the first decoder layer
(:func:`hsr_lib.decoder.trace` with ``keep="first"``); the cache then holds, per batch, the hidden
state entering the current layer and the keyword arguments every layer receives. A pass runs one
layer over every batch with forward pre-hooks on its linears that see what each linear sees:

* q/k/v_proj: the input-layernormed hidden states; o_proj: the attention output;
  gate/up_proj: the post-attention-layernormed states; down_proj: act(gate) · up;
* only the rows at response positions are handed on (``[start, end)`` of each sample, shifted
  by its left padding in a batch);
* Mllama cross-attention k_proj/v_proj read the vision tokens, not text: they are handed every
  vision token that at least one response position may attend to (every tile of the sample's
  images, padding tiles left out), since the response reads all of them.

With ``offload=True`` the decoder layers live on the CPU and visit the compute device one at a
time (:func:`layer_on_device`), so calibration needs one layer plus the cache in device memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .data import Sample, open_image
from .decoder import trace
from .models import DTYPES, LoadedModel, load_from_params, load_model, resolve_device, resolve_dtype
from .progress import maybe
from .prompts import calibration_special_tokens, conversation_text, encode, encode_calibration

InputHook = Callable[[str, torch.Tensor], None]


@dataclass
class CalBatch:
    """One batch of calibration samples at the current layer of a :class:`Calibration`."""

    ids: list[str]
    hidden: torch.Tensor  # [B, T, D]: input of the current layer
    kwargs: list[dict[str, Any] | None]  # per layer: keyword arguments (None: the model skips it)
    select: torch.Tensor  # [B, T] bool: response positions
    labels: torch.Tensor  # [B, T] long: token ids at response positions, -100 elsewhere (HF convention)
    vision_select: torch.Tensor | None = None  # [B, V] bool: Mllama vision tokens the response attends to

    @property
    def size(self) -> int:
        return self.hidden.shape[0]


@dataclass
class Calibration:
    """Cached decoder inputs of a set of calibration samples, advanced one layer at a time."""

    batches: list[CalBatch]
    layer: int = 0  # the layer whose input ``batches[*].hidden`` is

    @property
    def n_samples(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def n_tokens(self) -> int:
        """Response positions over all samples."""
        return int(sum(b.select.sum() for b in self.batches))

    @property
    def ids(self) -> list[str]:
        return [i for b in self.batches for i in b.ids]

    def advance(self, outputs: Sequence[torch.Tensor]) -> None:
        """Replace each batch's hidden state by ``outputs`` (the current layer's outputs)."""
        if len(outputs) != len(self.batches):
            raise ValueError(f"advance: {len(outputs)} outputs for {len(self.batches)} batches")
        for b, out in zip(self.batches, outputs):
            b.hidden = out
        self.layer += 1


def encode_batch(lm: LoadedModel, samples: Sequence[Sample], fidelity: str = "paper"
                 ) -> tuple[Any, list[tuple[int, int]]]:
    """Conversations of ``samples`` in one left-padded batch and each one's response span in it."""
    cals = [encode_calibration(lm.processor, s, fidelity, lm.adapter) for s in samples]
    if len(cals) == 1:
        return cals[0].inputs.to(lm.device), [(cals[0].start, cals[0].end)]
    texts = [conversation_text(lm.processor, s.question, s.response, lm.adapter) for s in samples]
    inputs = encode(lm.processor, texts, [open_image(s.image, s.id) for s in samples],
                    add_special_tokens=calibration_special_tokens(lm.processor, fidelity))
    ids, spans = inputs["input_ids"], []
    for b, cal in enumerate(cals):
        pad = ids.shape[1] - cal.input_ids.shape[0]
        if pad < 0 or not torch.equal(ids[b, pad:], cal.input_ids):
            raise ValueError(f"sample {cal.id}: its tokens change when batched with others; use scores.batch_size 1")
        spans.append((cal.start + pad, cal.end + pad))
    return inputs.to(lm.device), spans


def _vision_select(kw: dict[str, Any] | None, select: torch.Tensor) -> torch.Tensor | None:
    """Mllama: [B, V] vision tokens that some response position may attend to (None elsewhere)."""
    if kw is None or kw.get("cross_attention_states") is None or kw.get("cross_attention_mask") is None:
        return None
    mask = kw["cross_attention_mask"][:, 0]  # [B, T, V]: 0 where a text row may attend, min where not
    ok = mask == 0
    rows = kw.get("full_text_row_masked_out_mask")
    if rows is not None:
        ok = ok & (rows[:, 0] != 0)  # rows that attend to no image are all 0 after masking: not reading
    return (ok & select[:, :, None]).any(dim=1)


def build(lm: LoadedModel, samples: Sequence[Sample], fidelity: str = "paper", batch_size: int = 1,
          progress: bool = True, desc: str = "calibration cache") -> Calibration:
    """Trace every batch of ``samples`` once up to the first decoder layer and cache its inputs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if not samples:
        raise ValueError("calibration needs at least one sample")
    batches = []
    starts = range(0, len(samples), batch_size)
    for s0 in maybe(starts, progress, desc=desc, total=len(starts)):
        chunk = samples[s0:s0 + batch_size]
        inputs, spans = encode_batch(lm, chunk, fidelity)
        tr = trace(lm, inputs, keep="first")
        ids = inputs["input_ids"]
        select = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        labels = torch.full_like(ids, -100)
        for b, (a, e) in enumerate(spans):
            select[b, a:e] = True
            labels[b, a:e] = ids[b, a:e]
        vsel = next((v for kw in tr.kwargs if (v := _vision_select(kw, select)) is not None), None)
        batches.append(CalBatch([s.id for s in chunk], tr.hidden[0], tr.kwargs, select, labels, vsel))
    return Calibration(batches)


def layer_linears(lm: LoadedModel, layer: int) -> dict[str, nn.Linear]:
    """The prunable linears of decoder layer ``layer``, keyed ``layers.{i}.{module}``."""
    prefix = f"layers.{layer}."
    return {k: v for k, v in lm.prunable_linears().items() if k.startswith(prefix)}


def reads_vision(lm: LoadedModel, name: str) -> bool:
    """Whether linear ``name`` reads Mllama's vision tokens (cross-attention k_proj / v_proj)."""
    parts = name.split(".")
    return int(parts[1]) in lm.geometry.cross_layers and parts[-1] in ("k_proj", "v_proj")


def selected_rows(x: torch.Tensor, batch: CalBatch, vision: bool) -> torch.Tensor:
    """The rows of a linear's input ``x`` that feed the scores, as [n, in]."""
    if vision:
        if batch.vision_select is None:
            raise RuntimeError("a cross-attention layer ran without cross-attention states")
        return x.reshape(batch.size, -1, x.shape[-1])[batch.vision_select]
    return x[batch.select]


@contextmanager
def layer_on_device(lm: LoadedModel, layer: int, offload: bool) -> Iterator[nn.Module]:
    """Decoder layer ``layer`` on the compute device for the block (and back to the CPU after, offloaded)."""
    mod = lm.layers[layer]
    if offload:
        mod.to(lm.device)
    try:
        yield mod
    finally:
        if offload:
            mod.to("cpu")


class _Stop(Exception):
    """Ends a layer's pass once every linear has seen its input."""


def run_layer(lm: LoadedModel, cal: Calibration, on_input: InputHook | None = None,
              outputs: bool = True) -> list[torch.Tensor]:
    """Run the current layer of ``cal`` over every batch; ``on_input(name, rows)`` sees the
    selected input rows of each of its linears. Returns the layer's outputs; with
    ``outputs=False`` each pass stops as soon as every linear has seen its input (the last
    matmul, down_proj, is skipped) and nothing is returned."""
    i = cal.layer
    layer = lm.layers[i]
    lins = layer_linears(lm, i)
    current: list[CalBatch] = []
    last: list = [None, None]  # (input tensor, its selected rows): q/k/v and gate/up share one input
    seen: set[str] = set()

    def hook(name: str, vision: bool):
        def pre(module, args):
            if args[0] is not last[0]:
                last[:] = [args[0], selected_rows(args[0], current[0], vision)]
            on_input(name, last[1])  # the same rows object for linears that share an input
            seen.add(name)
            if not outputs and len(seen) == len(lins):
                raise _Stop
        return pre

    if on_input is None and not outputs:
        return []
    handles = [] if on_input is None else [lin.register_forward_pre_hook(hook(name, reads_vision(lm, name)))
                                           for name, lin in lins.items()]
    outs = []
    try:
        with torch.no_grad():
            for b in cal.batches:
                current[:] = [b]
                seen.clear()
                kw = b.kwargs[i]
                if kw is None:  # the model skips this layer for these inputs
                    outs.append(b.hidden)
                    continue
                try:
                    out = layer(b.hidden, **kw)
                except _Stop:
                    continue
                outs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for h in handles:
            h.remove()
        last.clear()
    return outs if outputs else []


def load_for_calibration(P) -> LoadedModel:
    """Load the model of params ``P``; with ``scores.offload_layers`` on an accelerator, the decoder
    layers stay on the CPU and everything else (vision tower, embeddings, norm, head) goes to it."""
    m = P.model
    dev = resolve_device(m.device)
    if not P.scores.offload_layers or dev.type == "cpu":
        return load_from_params(P)
    dtype = resolve_dtype(m.dtype, dev)
    name = next(k for k, v in DTYPES.items() if v == dtype)
    lm = load_model(m.name, family=m.family, dtype=name, device="cpu", attn_implementation=m.attn_implementation,
                    seed=P.seed)
    text = lm.adapter.language_model(lm.model)
    layers = text.layers
    text.layers = nn.ModuleList()
    try:
        lm.model.to(dev)
    finally:
        text.layers = layers
    lm.device = dev
    return lm


def loss_positions(batch: CalBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the response loss is read: (batch rows, positions t-1, target ids at t) for every
    labelled position t (HF's shift: position t-1 predicts token t)."""
    rows, pos = torch.nonzero(batch.labels[:, 1:] != -100, as_tuple=True)
    return rows, pos, batch.labels[rows, pos + 1]


@torch.no_grad()
def response_losses(lm: LoadedModel, samples: Sequence[Sample], fidelity: str = "paper",
                    progress: bool = False) -> list[float]:
    """Mean cross-entropy over the response positions of each sample (a full forward each)."""
    out = []
    for s in maybe(samples, progress, desc="loss"):
        cal = encode_calibration(lm.processor, s, fidelity, lm.adapter, device=lm.device)
        out.append(float(lm.model(**cal.inputs, labels=cal.labels().to(lm.device), use_cache=False).loss))
    return out
